//! The cost-savings report: totals, breakdowns, trends, hot and cold keys, storage and
//! suggestions, built from hourly rollups ([`HourRow`]) of one node or merged from many.

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, DurationRound, Utc};
use serde::{Deserialize, Serialize};

use crate::counters::Hits;
use crate::rollup::{AGE_BUCKETS_SECS, HourRow, Rollup, add_each, nano_to_usd};
use crate::sketch::HotKey;

/// How the report's groups (table rows, CSV rows) are formed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// One group per model.
    #[default]
    Model,
    /// One group per provider.
    Provider,
    /// One group per UTC day.
    Day,
    /// One group per UTC hour.
    Hour,
    /// One group per HTTP API route (entries the response cache stored: provider
    /// [`HTTP_PROVIDER`]; LLM lookups are left out of the groups, not of the totals).
    Route,
}

/// The provider API response entries record: their "model" is the route's name.
pub const HTTP_PROVIDER: &str = "http";

impl FromStr for GroupBy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "model" => Ok(GroupBy::Model),
            "provider" => Ok(GroupBy::Provider),
            "day" => Ok(GroupBy::Day),
            "hour" => Ok(GroupBy::Hour),
            "route" => Ok(GroupBy::Route),
            other => Err(format!(
                "unknown grouping `{other}` (expected model, provider, day, hour or route)"
            )),
        }
    }
}

/// What a set of lookups did and saved: the report's totals and each of its groups.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The group (a model, a provider, a day, an hour); empty for the totals.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// Lookups.
    pub requests: u64,
    /// Hits over lookups.
    pub hit_rate: f64,
    /// Hits per tier.
    pub hits: Hits,
    /// Lookups that went upstream.
    pub misses: u64,
    /// Requests that could not be keyed.
    pub uncacheable: u64,
    /// Entries found expired.
    pub expired: u64,
    /// USD the hits would have cost (each hit: the original call's cost, from its entry).
    pub cost_saved_usd: f64,
    /// USD the misses paid upstream.
    pub cost_spent_usd: f64,
    /// Tokens the hits did not spend, input plus output.
    pub tokens_saved: u64,
    /// Input tokens saved.
    pub input_tokens_saved: u64,
    /// Output tokens saved.
    pub output_tokens_saved: u64,
    /// Upstream latency the hits avoided.
    pub latency_saved_ms: u64,
    /// Mean lookup time of a hit, in microseconds.
    pub avg_hit_lookup_us: f64,
}

impl Summary {
    /// The summary of a rollup.
    pub fn of(group: String, r: &Rollup) -> Summary {
        let hits = r.hits();
        Summary {
            group,
            requests: r.lookups,
            hit_rate: if r.lookups == 0 {
                0.0
            } else {
                hits as f64 / r.lookups as f64
            },
            hits: Hits {
                l1: r.l1,
                l2: r.l2,
                l3: r.l3,
                coalesced: r.coalesced,
            },
            misses: r.misses,
            uncacheable: r.uncacheable,
            expired: r.expired,
            cost_saved_usd: nano_to_usd(r.cost_saved_nano),
            cost_spent_usd: nano_to_usd(r.cost_spent_nano),
            tokens_saved: r.input_tokens_saved.saturating_add(r.output_tokens_saved),
            input_tokens_saved: r.input_tokens_saved,
            output_tokens_saved: r.output_tokens_saved,
            latency_saved_ms: r.latency_saved_ms,
            avg_hit_lookup_us: if hits == 0 {
                0.0
            } else {
                r.hit_lookup_us as f64 / hits as f64
            },
        }
    }
}

/// Storage one tier uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierStorage {
    /// `l1`, `l2` or `l3`.
    pub tier: String,
    /// Entries held.
    pub entries: u64,
    /// Bytes held.
    pub bytes: u64,
    /// The bound, if any.
    pub capacity: Option<u64>,
}

/// Entries never hit and older than a threshold: what they hold for nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColdEntries {
    /// The age threshold, in seconds.
    pub older_than_secs: u64,
    /// Cold entries.
    pub entries: u64,
    /// Bytes they hold.
    pub bytes: u64,
    /// Per model, most bytes first.
    pub by_model: Vec<ColdModel>,
}

/// Cold entries of one model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColdModel {
    /// The model.
    pub model: String,
    /// Cold entries.
    pub entries: u64,
    /// Bytes they hold.
    pub bytes: u64,
}

/// Something the data says would save more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Suggestion {
    /// Misses that would have hit under the `aggressive` normalization profile.
    AggressiveProfile {
        /// Misses that would have hit.
        misses: u64,
        /// What they cost upstream (what `aggressive` would have saved).
        cost_usd: f64,
        /// The suggestion in words.
        text: String,
    },
    /// A model whose hit rate is low, with a TTL its hits and expired lookups support.
    Ttl {
        /// The model.
        model: String,
        /// Its hit rate.
        hit_rate: f64,
        /// The TTL in force, in seconds (`None`: no expiry).
        current_ttl_secs: Option<u64>,
        /// The TTL the data supports, in seconds (`None`: no expiry).
        suggested_ttl_secs: Option<u64>,
        /// The suggestion in words.
        text: String,
    },
}

/// What the report covers and how it groups.
#[derive(Debug, Clone, Default)]
pub struct ReportOptions {
    /// Rows from this time on.
    pub since: Option<DateTime<Utc>>,
    /// Rows before this time.
    pub until: Option<DateTime<Utc>>,
    /// The grouping of the table and CSV.
    pub group_by: GroupBy,
    /// How many hot keys.
    pub top: usize,
}

/// What the report says beyond the rollups: filled in by whoever holds the tiers.
#[derive(Debug, Clone, Default)]
pub struct ReportExtras {
    /// The nodes whose rollups are in (empty: this node only).
    pub nodes: Vec<String>,
    /// Hottest keys, most hits first.
    pub hot_keys: Vec<HotKey>,
    /// Cold entries, when the disk tier was scanned.
    pub cold: Option<ColdEntries>,
    /// Storage per tier (this node).
    pub storage: Vec<TierStorage>,
    /// Events dropped because the recording channel was full.
    pub dropped_events: u64,
    /// The default TTL in seconds (`None`: entries never expire).
    pub default_ttl_secs: Option<u64>,
    /// TTLs per model, in seconds, where they differ from the default.
    pub model_ttl_secs: BTreeMap<String, u64>,
}

/// The report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// When it was built.
    pub generated_at: DateTime<Utc>,
    /// Start of the period (`None`: from the first row), at the start of its hour: rollups are
    /// hourly, and the hour a bound falls in is counted whole.
    pub since: Option<DateTime<Utc>>,
    /// End of the period (`None`: up to now), at the end of its hour.
    pub until: Option<DateTime<Utc>>,
    /// Nodes whose rollups are in (empty: this node only).
    pub nodes: Vec<String>,
    /// Totals over the period.
    #[serde(flatten)]
    pub totals: Summary,
    /// The grouping of `groups`.
    pub group_by: GroupBy,
    /// One summary per group of `group_by`.
    pub groups: Vec<Summary>,
    /// Per model, most cost saved first.
    pub by_model: Vec<Summary>,
    /// Per provider, most cost saved first.
    pub by_provider: Vec<Summary>,
    /// Per UTC day, oldest first.
    pub by_day: Vec<Summary>,
    /// Per UTC hour, oldest first.
    pub by_hour: Vec<Summary>,
    /// The hottest keys since the first record (the sketch is not kept per hour): not limited
    /// to the period.
    pub hot_keys: Vec<HotKey>,
    /// Entries never hit and older than a threshold.
    pub cold: Option<ColdEntries>,
    /// Storage per tier.
    pub storage: Vec<TierStorage>,
    /// What to change.
    pub suggestions: Vec<Suggestion>,
    /// Lookups not recorded because the recording channel was full.
    pub dropped_events: u64,
}

/// A model needs at least this many lookups before its hit rate counts as low.
const MIN_LOOKUPS_FOR_TTL: u64 = 20;
/// A hit rate below this is low.
const LOW_HIT_RATE: f64 = 0.5;

impl Report {
    /// Builds the report from rows (of any number of nodes) and the extras.
    pub fn build(rows: &[HourRow], options: &ReportOptions, extras: ReportExtras) -> Report {
        let in_period = |row: &&HourRow| {
            let start = row.key.start();
            options.since.is_none_or(|s| row_end(row) > s)
                && options.until.is_none_or(|u| start < u)
        };
        let rows: Vec<&HourRow> = rows.iter().filter(in_period).collect();
        let mut totals = Rollup::default();
        let mut by_model: BTreeMap<String, Rollup> = BTreeMap::new();
        let mut by_provider: BTreeMap<String, Rollup> = BTreeMap::new();
        let mut by_day: BTreeMap<String, Rollup> = BTreeMap::new();
        let mut by_hour: BTreeMap<String, Rollup> = BTreeMap::new();
        let mut by_route: BTreeMap<String, Rollup> = BTreeMap::new();
        for row in &rows {
            if row.key.provider == HTTP_PROVIDER {
                by_route
                    .entry(row.key.model.clone())
                    .or_default()
                    .add(&row.rollup);
            }
            totals.add(&row.rollup);
            by_model
                .entry(row.key.model.clone())
                .or_default()
                .add(&row.rollup);
            by_provider
                .entry(row.key.provider.clone())
                .or_default()
                .add(&row.rollup);
            by_day
                .entry(row.key.day().to_string())
                .or_default()
                .add(&row.rollup);
            by_hour
                .entry(row.key.start().format("%Y-%m-%dT%H:00Z").to_string())
                .or_default()
                .add(&row.rollup);
        }
        let most_saved = |map: &BTreeMap<String, Rollup>| {
            let mut out: Vec<Summary> =
                map.iter().map(|(k, r)| Summary::of(k.clone(), r)).collect();
            out.sort_by(|a, b| {
                b.cost_saved_usd
                    .total_cmp(&a.cost_saved_usd)
                    .then_with(|| b.requests.cmp(&a.requests))
                    .then_with(|| a.group.cmp(&b.group))
            });
            out
        };
        let in_order = |map: &BTreeMap<String, Rollup>| {
            map.iter()
                .map(|(k, r)| Summary::of(k.clone(), r))
                .collect::<Vec<_>>()
        };
        let by_model_list = most_saved(&by_model);
        let by_provider_list = most_saved(&by_provider);
        let by_day_list = in_order(&by_day);
        let by_hour_list = in_order(&by_hour);
        let groups = match options.group_by {
            GroupBy::Model => by_model_list.clone(),
            GroupBy::Provider => by_provider_list.clone(),
            GroupBy::Day => by_day_list.clone(),
            GroupBy::Hour => by_hour_list.clone(),
            GroupBy::Route => most_saved(&by_route),
        };
        let suggestions = suggestions(&totals, &by_model, &extras);
        let mut hot_keys = extras.hot_keys;
        hot_keys.truncate(options.top);
        // Rollups are hourly: the period covered is the whole hours the bounds fall in.
        let hour = chrono::TimeDelta::hours(1);
        let floor = |t: DateTime<Utc>| t.duration_trunc(hour).unwrap_or(t);
        let ceil = |t: DateTime<Utc>| match floor(t) {
            start if start == t => t,
            start => start.checked_add_signed(hour).unwrap_or(t),
        };
        Report {
            generated_at: Utc::now(),
            since: options.since.map(floor),
            until: options.until.map(ceil),
            nodes: extras.nodes,
            totals: Summary::of(String::new(), &totals),
            group_by: options.group_by,
            groups,
            by_model: by_model_list,
            by_provider: by_provider_list,
            by_day: by_day_list,
            by_hour: by_hour_list,
            hot_keys,
            cold: extras.cold,
            storage: extras.storage,
            suggestions,
            dropped_events: extras.dropped_events,
        }
    }
}

fn row_end(row: &HourRow) -> DateTime<Utc> {
    row.key
        .start()
        .checked_add_signed(chrono::Duration::hours(1))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The smallest age bound (seconds) covering 95% of `ages`; `None` when the oldest bucket
/// ("older than 30 days") is needed, or there are no ages.
fn ttl_covering(ages: &[u64]) -> Option<Option<u64>> {
    let total = ages.iter().fold(0u64, |sum, &n| sum.saturating_add(n));
    if total == 0 {
        return None;
    }
    let need = (total as f64 * 0.95).ceil() as u64;
    let mut seen = 0;
    for (i, n) in ages.iter().enumerate() {
        seen = n.saturating_add(seen);
        if seen >= need {
            return Some(AGE_BUCKETS_SECS.get(i).copied());
        }
    }
    Some(None)
}

/// Seconds in words: `10m`, `6h`, `7d`.
pub fn human_secs(secs: Option<u64>) -> String {
    match secs {
        None => "no expiry".into(),
        Some(s) if s % 86_400 == 0 => format!("{}d", s / 86_400),
        Some(s) if s % 3_600 == 0 => format!("{}h", s / 3_600),
        Some(s) if s % 60 == 0 => format!("{}m", s / 60),
        Some(s) => format!("{s}s"),
    }
}

fn suggestions(
    totals: &Rollup,
    by_model: &BTreeMap<String, Rollup>,
    extras: &ReportExtras,
) -> Vec<Suggestion> {
    let mut out = Vec::new();
    if totals.aggressive_would_hit > 0 {
        let cost = nano_to_usd(totals.aggressive_would_save_nano);
        out.push(Suggestion::AggressiveProfile {
            misses: totals.aggressive_would_hit,
            cost_usd: cost,
            text: format!(
                "{} misses would have hit under the `aggressive` profile (whitespace and case \
                 in message text ignored), saving ${cost:.2}; it can merge requests whose right \
                 answers differ, so enable it only where that is acceptable",
                totals.aggressive_would_hit
            ),
        });
    }
    for (model, r) in by_model {
        if r.lookups < MIN_LOOKUPS_FOR_TTL {
            continue;
        }
        let hit_rate = r.hits() as f64 / r.lookups as f64;
        if hit_rate >= LOW_HIT_RATE {
            continue;
        }
        let current = extras
            .model_ttl_secs
            .get(model)
            .copied()
            .or(extras.default_ttl_secs);
        let longer = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (None, Some(_)) => true,
            (Some(a), Some(b)) => a > b,
            _ => false,
        };
        let suggestion = if r.expired > 0 {
            let mut ages = r.hit_ages;
            add_each(&mut ages, &r.expired_ages);
            ttl_covering(&ages)
                .filter(|&suggested| longer(suggested, current))
                .map(|suggested| {
                    let text = format!(
                        "{model}: hit rate {:.1}%, and {} lookups found an entry past its TTL of \
                         {}; 95% of repeats come within {}: a TTL of {} would have served them",
                        hit_rate * 100.0,
                        r.expired,
                        human_secs(current),
                        human_secs(suggested),
                        human_secs(suggested)
                    );
                    (suggested, text)
                })
        } else {
            ttl_covering(&r.hit_ages)
                .filter(|&suggested| longer(current, suggested.map(|s| s * 4)))
                .map(|suggested| {
                    let text = format!(
                        "{model}: hit rate {:.1}%, and 95% of its hits come within {} of the \
                         entry's creation; a TTL of {} instead of {} keeps them and frees the \
                         storage of entries nobody asks for again",
                        hit_rate * 100.0,
                        human_secs(suggested),
                        human_secs(suggested),
                        human_secs(current)
                    );
                    (suggested, text)
                })
        };
        if let Some((suggested, text)) = suggestion {
            out.push(Suggestion::Ttl {
                model: model.clone(),
                hit_rate,
                current_ttl_secs: current,
                suggested_ttl_secs: suggested,
                text,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollup::RowKey;

    fn row(hour: i64, model: &str, f: impl FnOnce(&mut Rollup)) -> HourRow {
        let mut rollup = Rollup::default();
        f(&mut rollup);
        HourRow {
            key: RowKey {
                hour,
                model: model.into(),
                provider: "p".into(),
            },
            rollup,
        }
    }

    #[test]
    fn totals_and_groups_add_up_and_the_period_filters() {
        let h = RowKey::hour_of(Utc::now());
        let rows = vec![
            row(h - 48, "a", |r| {
                r.lookups = 10;
                r.l1 = 4;
                r.misses = 6;
                r.cost_saved_nano = 4_000_000_000;
            }),
            row(h, "a", |r| {
                r.lookups = 5;
                r.l2 = 5;
                r.cost_saved_nano = 1_500_000_000;
            }),
            row(h, "b", |r| {
                r.lookups = 5;
                r.misses = 5;
            }),
        ];
        let all = Report::build(
            &rows,
            &ReportOptions {
                top: 10,
                ..Default::default()
            },
            ReportExtras::default(),
        );
        assert_eq!(all.totals.requests, 20);
        assert_eq!(all.totals.hits.l1 + all.totals.hits.l2, 9);
        assert!((all.totals.cost_saved_usd - 5.5).abs() < 1e-9);
        assert_eq!(all.by_model[0].group, "a");
        assert_eq!(all.by_day.len(), 2);
        let recent = Report::build(
            &rows,
            &ReportOptions {
                since: Some(Utc::now() - chrono::Duration::hours(2)),
                top: 10,
                ..Default::default()
            },
            ReportExtras::default(),
        );
        assert_eq!(recent.totals.requests, 10);
        assert!((recent.totals.cost_saved_usd - 1.5).abs() < 1e-9);
    }

    /// The period a report shows is the hours it counts: a bound inside an hour takes it whole.
    #[test]
    fn the_period_shown_is_the_whole_hours_counted() {
        let at = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let h = RowKey::hour_of(at("2026-11-29T20:14:00Z"));
        let rows = vec![row(h, "m", |r| r.lookups = 7)];
        let report = Report::build(
            &rows,
            &ReportOptions {
                since: Some(at("2026-11-29T20:14:55Z")),
                until: Some(at("2026-11-29T20:14:58Z")),
                ..Default::default()
            },
            ReportExtras::default(),
        );
        assert_eq!(report.totals.requests, 7);
        assert_eq!(report.since, Some(at("2026-11-29T20:00:00Z")));
        assert_eq!(report.until, Some(at("2026-11-29T21:00:00Z")));
        let exact = Report::build(
            &rows,
            &ReportOptions {
                until: Some(at("2026-11-29T21:00:00Z")),
                ..Default::default()
            },
            ReportExtras::default(),
        );
        assert_eq!(exact.until, Some(at("2026-11-29T21:00:00Z")));
    }

    /// Rows and hot keys from other nodes' documents are read as given: counts at the top of
    /// the range, the last hour a date can hold and a key that is not hex neither panic nor wrap.
    #[test]
    fn rows_and_hot_keys_from_other_nodes_at_the_edges() {
        let h = RowKey::hour_of(Utc::now());
        let huge = |r: &mut Rollup| {
            r.lookups = u64::MAX;
            r.l1 = u64::MAX;
            r.l2 = u64::MAX;
            r.coalesced = u64::MAX;
            r.misses = u64::MAX;
            r.uncacheable = u64::MAX;
            r.expired = u64::MAX;
            r.hit_ages = [u64::MAX; crate::rollup::AGE_BUCKETS];
            r.expired_ages = [u64::MAX; crate::rollup::AGE_BUCKETS];
            r.cost_saved_nano = u64::MAX;
            r.input_tokens_saved = u64::MAX;
            r.output_tokens_saved = u64::MAX;
        };
        let last_hour = DateTime::<Utc>::MAX_UTC.timestamp() / 3600;
        let rows = vec![
            row(h, "a", huge),
            row(h, "a", huge),
            row(last_hour, "b", huge),
            row(i64::MAX, "c", huge),
            // A model name that would clear the screen, and one a spreadsheet would run.
            row(h, "d\u{1b}[2J", huge),
            row(h, "=cmd|' /C calc'!A0", huge),
        ];
        let extras = ReportExtras {
            hot_keys: vec![HotKey {
                cache_key: "gpt-4o_aéééééééééééé".into(),
                model: "gpt-4o".into(),
                preview: "hi\u{7}".into(),
                hits: 3,
                error: 0,
            }],
            ..ReportExtras::default()
        };
        let report = Report::build(
            &rows,
            &ReportOptions {
                top: 10,
                ..Default::default()
            },
            extras,
        );
        assert_eq!(report.totals.requests, u64::MAX, "saturated, not wrapped");
        let table = crate::render::table(&report, 100);
        assert!(table.contains("aéééééééééé"), "{table}");
        assert!(
            !table.chars().any(|c| c.is_control() && c != '\n'),
            "{table}"
        );
        assert!(
            table.contains("d\\u{1b}[") && table.contains("hi\\u{7}"),
            "{table}"
        );
        let csv = crate::render::csv(&report).unwrap_or_default();
        assert!(csv.contains("'=cmd|"), "{csv}");
        assert!(!csv.lines().any(|l| l.starts_with('=')), "{csv}");
        for rendered in [crate::render::json(&report), crate::render::html(&report)] {
            assert!(rendered.is_ok_and(|text| !text.is_empty()));
        }
    }

    #[test]
    fn suggests_a_longer_ttl_when_lookups_find_expired_entries() {
        let h = RowKey::hour_of(Utc::now());
        let rows = vec![row(h, "m", |r| {
            r.lookups = 100;
            r.l1 = 10;
            r.misses = 90;
            r.expired = 40;
            r.hit_ages[2] = 10; // under an hour
            r.expired_ages[4] = 40; // under a day
            r.aggressive_would_hit = 3;
            r.aggressive_would_save_nano = 30_000_000;
        })];
        let report = Report::build(
            &rows,
            &ReportOptions::default(),
            ReportExtras {
                default_ttl_secs: Some(3_600),
                ..Default::default()
            },
        );
        let ttl = report.suggestions.iter().find_map(|s| match s {
            Suggestion::Ttl {
                suggested_ttl_secs, ..
            } => Some(*suggested_ttl_secs),
            _ => None,
        });
        assert_eq!(ttl, Some(Some(86_400)));
        assert!(
            report
                .suggestions
                .iter()
                .any(|s| matches!(s, Suggestion::AggressiveProfile { misses: 3, .. }))
        );
    }
}
