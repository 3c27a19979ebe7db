//! List prices per model, for exchanges that carry no cost of their own.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use strata_core::{Cost, Tokens};

/// The price table shipped with strata (`config/pricing.toml`).
pub const EMBEDDED_PRICING: &str = include_str!("../../../config/pricing.toml");

/// USD per one million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Per 1M input tokens.
    pub input: f64,
    /// Per 1M output tokens.
    pub output: f64,
}

/// Why a price table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    /// Not valid TOML, or not a price table. (The parser's message, not the error as a
    /// source: it would be printed twice in a chain.)
    #[error("pricing table: {0}")]
    Parse(String),
    /// A price is negative or not a number.
    #[error("pricing table: price of `{0}` must be a non-negative number")]
    BadPrice(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PricingFile {
    #[serde(default)]
    source: Option<String>,
    models: BTreeMap<String, Price>,
}

/// Prices by model name (lowercase). A dated snapshot's name (`gpt-4o-2024-08-06`,
/// `claude-sonnet-4-5@20250929`, `…-latest`) takes the price of the longest listed name it extends
/// (`gpt-4o`); another model that merely starts like a listed one (`gpt-4o-mini`,
/// `claude-opus-4-5` after `claude-opus-4`) does not.
#[derive(Debug, Clone, Default)]
pub struct Pricing {
    models: BTreeMap<String, Price>,
    source: Option<String>,
}

impl Pricing {
    /// The table shipped with strata.
    pub fn embedded() -> Result<Self, PricingError> {
        Pricing::from_toml(EMBEDDED_PRICING)
    }

    /// Reads a table in the format of `config/pricing.toml`.
    pub fn from_toml(text: &str) -> Result<Self, PricingError> {
        let file: PricingFile = toml::from_str(text).map_err(|e| {
            // One line, placed: the parser's own text draws the line over several.
            let place = e.span().map_or(String::new(), |span| {
                let before = &text.as_bytes()[..span.start.min(text.len())];
                let line = before.iter().filter(|b| **b == b'\n').count() + 1;
                let column = before.iter().rev().take_while(|b| **b != b'\n').count() + 1;
                format!(" at line {line}, column {column}")
            });
            PricingError::Parse(format!("{}{place}", e.message().trim_end()))
        })?;
        let mut models = BTreeMap::new();
        for (name, price) in file.models {
            let valid = |x: f64| x.is_finite() && x >= 0.0;
            if !valid(price.input) || !valid(price.output) {
                return Err(PricingError::BadPrice(name));
            }
            models.insert(name.to_lowercase(), price);
        }
        Ok(Pricing {
            models,
            source: file.source,
        })
    }

    /// Where the prices come from, as the table says.
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// The price of `model`, by exact name or by the longest listed name it extends with a
    /// date or version suffix.
    pub fn price(&self, model: &str) -> Option<Price> {
        let model = model.to_lowercase();
        if let Some(price) = self.models.get(&model) {
            return Some(*price);
        }
        self.models
            .iter()
            .filter(|(name, _)| {
                model
                    .strip_prefix(name.as_str())
                    .is_some_and(is_version_suffix)
            })
            .max_by_key(|(name, _)| name.len())
            .map(|(_, price)| *price)
    }

    /// What `tokens` cost on `model`, if the model is listed.
    pub fn cost(&self, model: &str, tokens: Tokens) -> Option<Cost> {
        let price = self.price(model)?;
        let input = tokens.input as f64 * price.input / 1e6;
        let output = tokens.output as f64 * price.output / 1e6;
        Some(Cost {
            input,
            output,
            total: input + output,
        })
    }

    /// The listed models.
    pub fn models(&self) -> impl Iterator<Item = (&str, &Price)> {
        self.models.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// What a provider appends to a model's name for a dated snapshot of it: `-2024-08-06`,
/// `-20250929`, `-0613`, `@20250929`, `:0`, `-latest`. Not `-5`, `-mini` or `-32k`: those name
/// other models (`claude-opus-4-5` is not a snapshot of `claude-opus-4`).
fn is_version_suffix(rest: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let stamp = |s: &str| {
        let date: Vec<&str> = s.split('-').collect();
        let is_date = matches!(date.as_slice(), [y, m, d] if y.len() == 4 && m.len() == 2
            && d.len() == 2 && date.iter().all(|p| digits(p)));
        s == "latest" || is_date || (digits(s) && s.len() >= 4)
    };
    if let Some(tag) = rest.strip_prefix('-').or_else(|| rest.strip_prefix('@')) {
        stamp(tag)
    } else if let Some(tag) = rest.strip_prefix(':') {
        digits(tag)
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_table_prices_every_example_model() {
        let pricing = Pricing::embedded().unwrap_or_else(|e| panic!("{e}"));
        for model in [
            "gpt-4o-mini",
            "gpt-4o",
            "claude-sonnet-4-5",
            "claude-haiku-4-5",
            "llama-3.1-70b-instruct",
        ] {
            assert!(pricing.price(model).is_some(), "{model} has no price");
        }
    }

    #[test]
    fn cost_is_usage_times_price_and_prefixes_match() {
        let pricing = Pricing::from_toml(
            "[models]\n\"gpt-4o\" = { input = 2.5, output = 10.0 }\n\"gpt-4o-mini\" = { input = 0.15, output = 0.6 }\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let cost = pricing
            .cost(
                "GPT-4o-2024-08-06",
                Tokens {
                    input: 1_000,
                    output: 500,
                },
            )
            .unwrap_or_default();
        assert!((cost.total - 0.0075).abs() < 1e-12);
        let mini = pricing.price("gpt-4o-mini-2024-07-18").map(|p| p.input);
        assert_eq!(mini, Some(0.15));
        assert!(pricing.price("unknown-model").is_none());
        // Snapshots take their model's price; another model that starts alike does not.
        let gpt4o = Pricing::from_toml("[models]\n\"gpt-4o\" = { input = 2.5, output = 10.0 }\n")
            .unwrap_or_else(|e| panic!("{e}"));
        for snapshot in [
            "gpt-4o-20240806",
            "gpt-4o@2024-08-06",
            "gpt-4o:1",
            "gpt-4o-latest",
        ] {
            assert_eq!(
                gpt4o.price(snapshot).map(|p| p.input),
                Some(2.5),
                "{snapshot}"
            );
        }
        for other in [
            "gpt-4o-mini",
            "gpt-4o-mini-2024-07-18",
            "gpt-4oo",
            "gpt-4o-",
            "gpt-4o-5",
            "gpt-4o-32k",
            "gpt-4o-2024-08",
        ] {
            assert!(gpt4o.price(other).is_none(), "{other}");
        }
        assert!(Pricing::from_toml("[models]\nx = { input = -1.0, output = 1.0 }").is_err());
        assert!(Pricing::from_toml("[models]\nx = { input = 1.0, outptu = 1.0 }").is_err());
        let message = Pricing::from_toml("[models]\nx = { input = \"a\", output = 1.0 }")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(message.lines().count(), 1, "{message}");
        assert!(message.contains("at line 2, column 15"), "{message}");
    }
}
