//! The report's renderers: a table for terminals, JSON, CSV (one row per group) and one
//! self-contained HTML file with SVG charts drawn by plotters.

use std::fmt::Write as _;
use std::time::Duration;

use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
use plotters::prelude::*;

use crate::report::{Report, Suggestion, Summary};

/// Why a report could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// JSON encoding failed.
    #[error("report as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// CSV encoding failed.
    #[error("report as CSV: {0}")]
    Csv(#[from] csv::Error),
    /// A chart could not be drawn.
    #[error("report chart: {0}")]
    Chart(String),
}

/// An integer with thousands separators: `21,738,801`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A duration for humans: `850 ms`, `12.3 s`, `4 min 10 s`, `3 h 20 min`.
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", d.as_secs_f64()),
        60_000..3_600_000 => format!("{} min {} s", ms / 60_000, (ms / 1000) % 60),
        _ => format!("{} h {} min", ms / 3_600_000, (ms / 60_000) % 60),
    }
}

/// The width of the terminal on standard output, or 100 columns when it is not a terminal.
pub fn terminal_width() -> u16 {
    Table::new().width().unwrap_or(100)
}

/// A duration in a few characters, for table cells: `850ms`, `42s`, `32m26s`, `2h11m`, `3d4h`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match d.as_millis() {
        0..1_000 => format!("{}ms", d.as_millis()),
        1_000..60_000 => format!("{s}s"),
        60_000..3_600_000 => format!("{}m{:02}s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{}h{:02}m", s / 3_600, (s / 60) % 60),
        _ => format!("{}d{}h", s / 86_400, (s / 3_600) % 24),
    }
}

/// Bytes for humans: `117.2 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn usd(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("${x:.2}")
    } else {
        format!("${x:.4}")
    }
}

fn period(report: &Report) -> String {
    let fmt = |t: Option<chrono::DateTime<chrono::Utc>>, none: &str| {
        t.map_or(none.to_owned(), |t| {
            t.format("%Y-%m-%d %H:%M UTC").to_string()
        })
    };
    format!(
        "{} → {}",
        fmt(report.since, "first record"),
        fmt(report.until, "now")
    )
}

/// The headline numbers, a few lines that fit any terminal.
pub fn headline(t: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  requests {} · hits {} ({:.2}%: L1 {} · L2 {} · L3 {}{}) · misses {}",
        thousands(t.requests),
        thousands(t.hits.total()),
        t.hit_rate * 100.0,
        thousands(t.hits.l1),
        thousands(t.hits.l2),
        thousands(t.hits.l3),
        if t.hits.coalesced > 0 {
            format!(" · coalesced {}", thousands(t.hits.coalesced))
        } else {
            String::new()
        },
        thousands(t.misses.saturating_add(t.uncacheable)),
    );
    let _ = writeln!(
        out,
        "  cost saved {} · tokens saved {} · latency saved {} · spent on misses {}",
        usd(t.cost_saved_usd),
        thousands(t.tokens_saved),
        human_duration(Duration::from_millis(t.latency_saved_ms)),
        usd(t.cost_spent_usd),
    );
    out
}

/// The groups as a table, at most `width` columns wide.
pub fn groups_table(groups: &[Summary], label: &str, width: u16) -> String {
    let mut table = Table::new();
    table
        .load_preset(presets::UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_width(width)
        .set_header(vec![
            label, "requests", "hit %", "L1", "L2", "L3", "misses", "saved", "tokens", "latency",
        ]);
    for g in groups {
        table.add_row(vec![
            if g.group.is_empty() {
                "(none)".to_owned()
            } else {
                printable(&g.group)
            },
            thousands(g.requests),
            format!("{:.1}", g.hit_rate * 100.0),
            thousands(g.hits.l1.saturating_add(g.hits.coalesced)),
            thousands(g.hits.l2),
            thousands(g.hits.l3),
            thousands(g.misses.saturating_add(g.uncacheable)),
            usd(g.cost_saved_usd),
            thousands(g.tokens_saved),
            short_duration(Duration::from_millis(g.latency_saved_ms)),
        ]);
    }
    for i in 1..10 {
        if let Some(column) = table.column_mut(i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table.to_string()
}

/// The report as text for a terminal `width` columns wide.
pub fn table(report: &Report, width: u16) -> String {
    let mut out = String::new();
    let nodes = if report.nodes.is_empty() {
        "this node".to_owned()
    } else {
        format!("nodes {}", printable(&report.nodes.join(", ")))
    };
    let _ = writeln!(out, "strata report · {} · {nodes}", period(report));
    out.push_str(&headline(&report.totals));
    if !report.groups.is_empty() {
        let label = serde_json::to_value(report.group_by)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        out.push_str(&groups_table(&report.groups, &label, width));
        out.push('\n');
    }
    if !report.hot_keys.is_empty() {
        let mut hot = Table::new();
        hot.load_preset(presets::UTF8_BORDERS_ONLY)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_width(width)
            // The sketch counts since the first record, whatever the period.
            .set_header(vec!["hot key (all time)", "hits", "model", "request"]);
        for key in &report.hot_keys {
            let short =
                key.cache_key
                    .rsplit_once('_')
                    .map_or(key.cache_key.as_str(), |(_, hex)| {
                        // Other nodes' documents are read as given: cut on a character boundary.
                        hex.char_indices().nth(12).map_or(hex, |(at, _)| &hex[..at])
                    });
            hot.add_row(vec![
                short.to_owned(),
                thousands(key.hits),
                printable(&key.model),
                printable(&key.preview),
            ]);
        }
        if let Some(column) = hot.column_mut(1) {
            column.set_cell_alignment(CellAlignment::Right);
        }
        out.push_str(&hot.to_string());
        out.push('\n');
    }
    if report.storage.iter().any(|s| s.entries > 0) {
        let parts: Vec<String> = report
            .storage
            .iter()
            .filter(|s| s.entries > 0)
            .map(|s| {
                format!(
                    "{} {} in {} entries",
                    s.tier.to_uppercase(),
                    human_bytes(s.bytes),
                    thousands(s.entries)
                )
            })
            .collect();
        let _ = writeln!(out, "  storage: {}", parts.join(" · "));
    }
    if let Some(cold) = &report.cold {
        let _ = writeln!(
            out,
            "  cold: {} entries never hit and older than {} hold {}",
            thousands(cold.entries),
            crate::report::human_secs(Some(cold.older_than_secs)),
            human_bytes(cold.bytes)
        );
    }
    for suggestion in &report.suggestions {
        let text = match suggestion {
            Suggestion::AggressiveProfile { text, .. } | Suggestion::Ttl { text, .. } => text,
        };
        let _ = writeln!(out, "  suggestion: {}", printable(text));
    }
    if report.dropped_events > 0 {
        let _ = writeln!(
            out,
            "  note: {} lookups were not recorded (recording channel full)",
            thousands(report.dropped_events)
        );
    }
    out
}

/// `text` with control characters written as escapes (`\u{1b}`): model names, previews and node
/// ids come from requests and from other nodes' documents, and a terminal would act on them.
fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A text cell a spreadsheet will not run: a group (a model or provider name, from requests)
/// that starts like a formula (`=`, `+`, `-`, `@`, tab, carriage return) gets a leading `'`,
/// as OWASP advises for CSV meant for spreadsheets.
fn inert_cell(text: &str) -> String {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_owned()
    }
}

/// The report as pretty JSON.
pub fn json(report: &Report) -> Result<String, RenderError> {
    Ok(serde_json::to_string_pretty(report)?)
}

/// One CSV row per group of the report's grouping.
pub fn csv(report: &Report) -> Result<String, RenderError> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record([
        "group",
        "requests",
        "hit_rate",
        "hits_l1",
        "hits_l2",
        "hits_l3",
        "hits_coalesced",
        "misses",
        "uncacheable",
        "expired",
        "cost_saved_usd",
        "cost_spent_usd",
        "tokens_saved",
        "input_tokens_saved",
        "output_tokens_saved",
        "latency_saved_ms",
    ])?;
    for g in &report.groups {
        writer.write_record([
            inert_cell(&g.group),
            g.requests.to_string(),
            format!("{:.6}", g.hit_rate),
            g.hits.l1.to_string(),
            g.hits.l2.to_string(),
            g.hits.l3.to_string(),
            g.hits.coalesced.to_string(),
            g.misses.to_string(),
            g.uncacheable.to_string(),
            g.expired.to_string(),
            format!("{:.9}", g.cost_saved_usd),
            format!("{:.9}", g.cost_spent_usd),
            g.tokens_saved.to_string(),
            g.input_tokens_saved.to_string(),
            g.output_tokens_saved.to_string(),
            g.latency_saved_ms.to_string(),
        ])?;
    }
    let bytes = writer
        .into_inner()
        .map_err(|e| RenderError::Chart(format!("csv buffer: {e}")))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn chart_err(e: impl std::fmt::Display) -> RenderError {
    RenderError::Chart(e.to_string())
}

const CHART_SIZE: (u32, u32) = (860, 320);

/// Hit rate per period (hours when the report spans at most three days, else days).
fn hit_rate_chart(points: &[Summary]) -> Result<String, RenderError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, CHART_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(chart_err)?;
        let n = points.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption("Hit rate over time (%)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(0f64..(n as f64 - 1.0).max(1.0), 0f64..100f64)
            .map_err(chart_err)?;
        let labels: Vec<String> = points.iter().map(|p| p.group.clone()).collect();
        chart
            .configure_mesh()
            .x_labels(labels.len().clamp(2, 8))
            .x_label_formatter(&|x| {
                labels
                    .get(x.round().max(0.0) as usize)
                    .cloned()
                    .unwrap_or_default()
            })
            .y_desc("hit rate %")
            .draw()
            .map_err(chart_err)?;
        let series: Vec<(f64, f64)> = points
            .iter()
            .enumerate()
            .map(|(i, p)| (i as f64, p.hit_rate * 100.0))
            .collect();
        chart
            .draw_series(LineSeries::new(series.clone(), BLUE.stroke_width(2)))
            .map_err(chart_err)?;
        chart
            .draw_series(
                series
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, BLUE.filled())),
            )
            .map_err(chart_err)?;
        root.present().map_err(chart_err)?;
    }
    Ok(svg)
}

/// Vertical bars, one per labelled value.
fn bar_chart(title: &str, y_desc: &str, bars: &[(String, f64)]) -> Result<String, RenderError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, CHART_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(chart_err)?;
        let top = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9) * 1.1;
        let n = bars.len().max(1) as u32;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            // A segmented `0..k` has k + 1 segments: `0..n - 1` gives one per bar (two for a single bar).
            .build_cartesian_2d((0u32..(n - 1).max(1)).into_segmented(), 0f64..top)
            .map_err(chart_err)?;
        let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n as usize + 1)
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .y_desc(y_desc)
            .draw()
            .map_err(chart_err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
                let i = i as u32;
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), *v),
                    ],
                    RGBColor(46, 125, 50).filled(),
                );
                bar.set_margin(0, 0, 12, 12);
                bar
            }))
            .map_err(chart_err)?;
        root.present().map_err(chart_err)?;
    }
    Ok(svg)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The report as one self-contained HTML page: no scripts or styles from elsewhere, charts as
/// inline SVG, readable offline.
pub fn html(report: &Report) -> Result<String, RenderError> {
    let trend = if report.by_hour.len() <= 72 {
        &report.by_hour
    } else {
        &report.by_day
    };
    let hit_rate = hit_rate_chart(trend)?;
    let per_day: Vec<(String, f64)> = report
        .by_day
        .iter()
        .map(|d| (d.group.clone(), d.cost_saved_usd))
        .collect();
    let cost_per_day = bar_chart("Cost saved per day (USD)", "USD", &per_day)?;
    let per_model: Vec<(String, f64)> = report
        .by_model
        .iter()
        .take(8)
        .map(|m| (m.group.clone(), m.cost_saved_usd))
        .collect();
    let models = bar_chart("Cost saved per model (USD)", "USD", &per_model)?;

    let mut page = String::new();
    let t = &report.totals;
    let _ = write!(
        page,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>strata report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 960px; color: #222; }}
h1 {{ font-size: 1.5rem; margin-bottom: .2rem; }}
.period {{ color: #666; margin-top: 0; }}
.cards {{ display: flex; flex-wrap: wrap; gap: .8rem; margin: 1rem 0; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: .6rem 1rem; min-width: 9rem; }}
.card b {{ display: block; font-size: 1.3rem; }}
figure.chart {{ margin: 1.2rem 0; }}
table {{ border-collapse: collapse; width: 100%; font-size: .9rem; }}
th, td {{ border-bottom: 1px solid #eee; padding: .3rem .5rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
td.text {{ text-align: left; }}
</style></head>
<body>
<h1>strata cost-savings report</h1>
<p class="period">{period} · {nodes} · generated {generated}</p>
<div class="cards">
<div class="card">requests<b>{requests}</b></div>
<div class="card">hit rate<b>{hit_rate:.2}%</b></div>
<div class="card">cost saved<b>{cost}</b></div>
<div class="card">tokens saved<b>{tokens}</b></div>
<div class="card">latency saved<b>{latency}</b></div>
</div>
<p>Hits: L1 {l1} · L2 {l2} · L3 {l3} · coalesced {co} · misses {misses}</p>
"#,
        period = escape(&period(report)),
        nodes = escape(&if report.nodes.is_empty() {
            "this node".to_owned()
        } else {
            format!("nodes {}", report.nodes.join(", "))
        }),
        generated = report.generated_at.format("%Y-%m-%d %H:%M UTC"),
        requests = thousands(t.requests),
        hit_rate = t.hit_rate * 100.0,
        cost = usd(t.cost_saved_usd),
        tokens = thousands(t.tokens_saved),
        latency = human_duration(Duration::from_millis(t.latency_saved_ms)),
        l1 = thousands(t.hits.l1),
        l2 = thousands(t.hits.l2),
        l3 = thousands(t.hits.l3),
        co = thousands(t.hits.coalesced),
        misses = thousands(t.misses.saturating_add(t.uncacheable)),
    );
    for (id, svg) in [
        ("hit-rate", hit_rate),
        ("cost-per-day", cost_per_day),
        ("per-model", models),
    ] {
        let _ = writeln!(page, r#"<figure class="chart" id="{id}">{svg}</figure>"#);
    }
    page.push_str("<h2>Per model</h2>\n<table><tr><th>model</th><th>requests</th><th>hit rate</th><th>L1</th><th>L2</th><th>L3</th><th>misses</th><th>cost saved</th><th>tokens saved</th><th>latency saved</th></tr>\n");
    for m in &report.by_model {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{:.1}%</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&m.group),
            thousands(m.requests),
            m.hit_rate * 100.0,
            thousands(m.hits.l1.saturating_add(m.hits.coalesced)),
            thousands(m.hits.l2),
            thousands(m.hits.l3),
            thousands(m.misses.saturating_add(m.uncacheable)),
            usd(m.cost_saved_usd),
            thousands(m.tokens_saved),
            human_duration(Duration::from_millis(m.latency_saved_ms)),
        );
    }
    page.push_str("</table>\n");
    if !report.hot_keys.is_empty() {
        page.push_str("<h2>Hot keys (all time, whatever the period)</h2>\n<table><tr><th>key</th><th>hits</th><th>model</th><th>request</th></tr>\n");
        for k in &report.hot_keys {
            let _ = writeln!(
                page,
                "<tr><td><code>{}</code></td><td>{}</td><td class=\"text\">{}</td><td class=\"text\">{}</td></tr>",
                escape(&k.cache_key),
                thousands(k.hits),
                escape(&k.model),
                escape(&k.preview)
            );
        }
        page.push_str("</table>\n");
    }
    if !report.suggestions.is_empty() {
        page.push_str("<h2>Suggestions</h2>\n<ul>\n");
        for s in &report.suggestions {
            let text = match s {
                Suggestion::AggressiveProfile { text, .. } | Suggestion::Ttl { text, .. } => text,
            };
            let _ = writeln!(page, "<li>{}</li>", escape(text));
        }
        page.push_str("</ul>\n");
    }
    if !report.storage.is_empty() || report.cold.is_some() {
        page.push_str("<h2>Storage</h2>\n<ul>\n");
        for s in &report.storage {
            let _ = writeln!(
                page,
                "<li>{}: {} in {} entries</li>",
                s.tier.to_uppercase(),
                human_bytes(s.bytes),
                thousands(s.entries)
            );
        }
        if let Some(cold) = &report.cold {
            let _ = writeln!(
                page,
                "<li>cold: {} entries never hit and older than {} hold {}</li>",
                thousands(cold.entries),
                crate::report::human_secs(Some(cold.older_than_secs)),
                human_bytes(cold.bytes)
            );
        }
        page.push_str("</ul>\n");
    }
    // Marks the page once the charts are in the DOM, for headless checks.
    page.push_str(
        "<script>\n\
         const charts = [...document.querySelectorAll('figure.chart svg')]\n\
           .filter(svg => svg.querySelector('polyline, path, rect, circle'));\n\
         document.body.dataset.charts = String(charts.length);\n\
         </script>\n</body></html>\n",
    );
    Ok(page)
}
