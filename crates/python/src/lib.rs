//! `strata._native`: the engine for the Python package `strata` (`python/strata/`).
//!
//! Requests and responses cross as JSON text; the package's Python side turns dicts into it
//! and back. Every lookup and all I/O run with the GIL released (`Python::detach`), on a tokio
//! runtime the cache owns; an executor that calls back into Python takes the GIL only for that
//! call, so threads waiting on one identical miss wait without it.

use std::sync::RwLock;
use std::time::Duration;

use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use serde_json::Value;
use strata::analytics::{GroupBy, ReportOptions};
use strata::core::Selector;
use strata::tiers::ReportSource;
use strata::{Completion, Config, Scope, TieredCache};

pyo3::create_exception!(
    _native,
    StrataError,
    PyException,
    "An error of the strata engine."
);

fn engine_error(e: impl std::fmt::Display) -> PyErr {
    StrataError::new_err(e.to_string())
}

/// The engine: a tiered cache and the runtime it runs on.
#[pyclass(frozen, module = "strata._native")]
struct Engine {
    runtime: tokio::runtime::Runtime,
    cache: RwLock<Option<TieredCache>>,
}

fn scope(user: Option<String>, session: Option<String>, namespace: Option<String>) -> Scope {
    match (session, user, namespace) {
        (Some(s), _, _) => Scope::Session(s),
        (None, Some(u), _) => Scope::User(u),
        (None, None, Some(n)) => Scope::Namespace(n),
        (None, None, None) => Scope::Global,
    }
}

fn parse(text: &[u8], what: &str) -> PyResult<Value> {
    serde_json::from_slice(text)
        .map_err(|e| PyValueError::new_err(format!("{what}: not JSON ({e})")))
}

/// What an executor that calls Python failed with: the Python exception, or a response that
/// is not JSON.
enum Failed {
    Python(PyErr),
    Json(serde_json::Error),
}

impl From<serde_json::Error> for Failed {
    fn from(e: serde_json::Error) -> Self {
        Failed::Json(e)
    }
}

fn reraise(py: Python<'_>, failed: &Failed) -> PyErr {
    match failed {
        Failed::Python(e) => e.clone_ref(py),
        Failed::Json(e) => {
            PyValueError::new_err(format!("the value cannot be stored as JSON: {e}"))
        }
    }
}

impl Engine {
    fn cache(&self) -> PyResult<TieredCache> {
        self.cache
            .read()
            .map_err(|_| engine_error("the cache's lock is poisoned"))?
            .clone()
            .ok_or_else(|| engine_error("the cache is closed"))
    }
}

#[pymethods]
impl Engine {
    /// Opens the cache of a configuration: the embedded default, `config` (a TOML file) if
    /// given, `STRATA_*` variables, then `overrides` (JSON: `{"disk_path": "…", …}`).
    #[new]
    #[pyo3(signature = (config=None, overrides=None))]
    fn new(
        py: Python<'_>,
        config: Option<std::path::PathBuf>,
        overrides: Option<String>,
    ) -> PyResult<Engine> {
        let overrides: Vec<(String, Value)> = match overrides {
            Some(text) => match parse(text.as_bytes(), "overrides")? {
                Value::Object(map) => map.into_iter().collect(),
                _ => return Err(PyValueError::new_err("overrides: a mapping of settings")),
            },
            None => Vec::new(),
        };
        let config = Config::load_with(config.as_deref(), &overrides).map_err(engine_error)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("strata-py")
            .enable_all()
            .build()
            .map_err(engine_error)?;
        let cache = py
            .detach(|| runtime.block_on(config.open_cache()))
            .map_err(engine_error)?;
        Ok(Engine {
            runtime,
            cache: RwLock::new(Some(cache)),
        })
    }

    /// The display key of a request (`model_32hex`), as `strata explain` prints it.
    #[pyo3(signature = (request, user=None, session=None, namespace=None))]
    fn key(
        &self,
        request: &[u8],
        user: Option<String>,
        session: Option<String>,
        namespace: Option<String>,
    ) -> PyResult<String> {
        let cache = self.cache()?;
        let keyed = cache
            .key_text(request, &scope(user, session, namespace))
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(keyed.key.to_string())
    }

    /// The cached response (JSON) and the tier it came from, or `None`.
    #[pyo3(signature = (request, user=None, session=None, namespace=None))]
    fn get(
        &self,
        py: Python<'_>,
        request: &[u8],
        user: Option<String>,
        session: Option<String>,
        namespace: Option<String>,
    ) -> PyResult<Option<(Py<pyo3::types::PyBytes>, &'static str)>> {
        let cache = self.cache()?;
        let scope = scope(user, session, namespace);
        // Inside the runtime's context but on this thread: a memory-tier hit never waits for a
        // worker, and a disk read still reaches the runtime's blocking pool. The key comes from
        // the key memo when these bytes were keyed before.
        let found = py
            .detach(|| {
                let keyed = cache.key_text(request, &scope)?;
                let _context = self.runtime.enter();
                Ok::<_, strata::core::RequestError>(futures::executor::block_on(
                    cache.get_keyed(&keyed),
                ))
            })
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(found.map(|lookup| {
            let text = pyo3::types::PyBytes::new(py, lookup.response().get().as_bytes()).unbind();
            (text, lookup.outcome.name())
        }))
    }

    /// Stores a response for a request.
    #[pyo3(signature = (request, response, user=None, session=None, namespace=None, provider=None, cost_usd=None, tags=None, ttl=None, latency_ms=None))]
    #[allow(clippy::too_many_arguments)]
    fn put(
        &self,
        py: Python<'_>,
        request: &[u8],
        response: &[u8],
        user: Option<String>,
        session: Option<String>,
        namespace: Option<String>,
        provider: Option<String>,
        cost_usd: Option<f64>,
        tags: Option<Vec<String>>,
        ttl: Option<f64>,
        latency_ms: Option<u64>,
    ) -> PyResult<()> {
        let cache = self.cache()?;
        let scope = scope(user, session, namespace);
        let keyed = py
            .detach(|| cache.key_text(request, &scope))
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let completion = completion(
            &parse(response, "response")?,
            provider,
            cost_usd,
            tags,
            ttl,
            latency_ms,
        )?;
        py.detach(|| self.runtime.block_on(cache.put_keyed(&keyed, completion)));
        Ok(())
    }

    /// The cached response, or `produce()`'s (JSON text, or a tuple of the JSON text and a dict
    /// of `provider`, `cost_usd`, `tags`, `ttl`), stored. Concurrent identical calls, from any
    /// number of threads, run `produce` once; its exception reaches each of them.
    #[pyo3(signature = (request, produce, user=None, session=None, namespace=None))]
    fn get_or_call(
        &self,
        py: Python<'_>,
        request: &[u8],
        produce: Py<PyAny>,
        user: Option<String>,
        session: Option<String>,
        namespace: Option<String>,
    ) -> PyResult<(String, &'static str)> {
        let cache = self.cache()?;
        let request = parse(request, "request")?;
        let scope = scope(user, session, namespace);
        let result = py.detach(|| {
            self.runtime
                .block_on(cache.get_or_execute(&request, &scope, || async {
                    let started = std::time::Instant::now();
                    Python::attach(|py| -> Result<Completion, Failed> {
                        let out = produce.call0(py).map_err(Failed::Python)?;
                        let (text, meta): (String, Option<Bound<'_, PyAny>>) =
                            match out.extract::<String>(py) {
                                Ok(text) => (text, None),
                                Err(_) => {
                                    let (text, meta): (String, Bound<'_, PyAny>) =
                                        out.extract(py).map_err(Failed::Python)?;
                                    (text, Some(meta))
                                }
                            };
                        let value: Value = serde_json::from_str(&text)?;
                        let get = |name: &str| {
                            meta.as_ref()
                                .and_then(|m| m.get_item(name).ok())
                                .filter(|v| !v.is_none())
                        };
                        let provider = get("provider")
                            .map(|v| v.extract::<String>())
                            .transpose()
                            .map_err(Failed::Python)?;
                        let cost = get("cost_usd")
                            .map(|v| v.extract::<f64>())
                            .transpose()
                            .map_err(Failed::Python)?;
                        let tags = get("tags")
                            .map(|v| v.extract::<Vec<String>>())
                            .transpose()
                            .map_err(Failed::Python)?;
                        let ttl = get("ttl")
                            .map(|v| v.extract::<f64>())
                            .transpose()
                            .map_err(Failed::Python)?;
                        let latency =
                            Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
                        completion(&value, provider, cost, tags, ttl, latency)
                            .map_err(Failed::Python)
                    })
                }))
        });
        match result {
            Ok(lookup) => Ok((lookup.response().get().to_string(), lookup.outcome.name())),
            Err(failed) => Err(reraise(py, &failed)),
        }
    }

    /// The typed cache: the JSON value stored under `key`, or `produce()`'s (JSON text),
    /// stored for `ttl` seconds. Concurrent calls for one key run `produce` once.
    #[pyo3(signature = (key, produce, ttl=None, tags=None))]
    fn get_or_insert(
        &self,
        py: Python<'_>,
        key: &str,
        produce: Py<PyAny>,
        ttl: Option<f64>,
        tags: Option<Vec<String>>,
    ) -> PyResult<String> {
        let cache = self.cache()?;
        let ttl = ttl.map(seconds).transpose()?;
        let tags = tags.unwrap_or_default();
        let result = py.detach(|| {
            self.runtime
                .block_on(cache.get_or_insert_tagged::<Value, _, _, Failed>(
                    key,
                    ttl,
                    tags,
                    || async {
                        Python::attach(|py| -> Result<Value, Failed> {
                            let out = produce.call0(py).map_err(Failed::Python)?;
                            let text: String = out.extract(py).map_err(Failed::Python)?;
                            Ok(serde_json::from_str(&text)?)
                        })
                    },
                ))
        });
        match result {
            Ok(value) => Ok(value.to_string()),
            Err(failed) => Err(reraise(py, &failed)),
        }
    }

    /// Invalidates by one selector (`model`, `user`, `session`, `namespace`, `tag`, `key`,
    /// `older_than` in seconds) on every node; the number of entries affected (an estimate for
    /// all but keys).
    fn invalidate(&self, py: Python<'_>, kind: &str, value: &str) -> PyResult<u64> {
        let cache = self.cache()?;
        let selector = match kind {
            "model" => Selector::Model(value.into()),
            "user" => Selector::User(value.into()),
            "session" => Selector::Session(value.into()),
            "namespace" => Selector::Namespace(value.into()),
            "tag" => Selector::Tag(value.into()),
            "key" => Selector::Key(value.into()),
            "older_than" => Selector::OlderThan(seconds(
                value
                    .parse::<f64>()
                    .map_err(|e| PyValueError::new_err(format!("older_than: {e}")))?,
            )?),
            other => {
                return Err(PyValueError::new_err(format!(
                    "`{other}` is not a selector"
                )));
            }
        };
        let done = py
            .detach(|| self.runtime.block_on(cache.invalidate(&selector)))
            .map_err(engine_error)?;
        Ok(done.affected)
    }

    /// Invalidates everything everywhere and empties this node's tiers.
    fn clear(&self, py: Python<'_>) -> PyResult<u64> {
        let cache = self.cache()?;
        let done = py
            .detach(|| self.runtime.block_on(cache.clear()))
            .map_err(engine_error)?;
        Ok(done.affected)
    }

    /// This process's counters, as JSON.
    fn stats(&self) -> PyResult<String> {
        serde_json::to_string(&self.cache()?.stats()).map_err(engine_error)
    }

    /// The report (JSON) since `since` ago (`"7d"`, `"1h"`), grouped `by`.
    #[pyo3(signature = (since=None, by=None))]
    fn report(
        &self,
        py: Python<'_>,
        since: Option<String>,
        by: Option<String>,
    ) -> PyResult<String> {
        let cache = self.cache()?;
        let since = since
            .map(|s| {
                let d = humantime::parse_duration(&s)
                    .map_err(|e| PyValueError::new_err(format!("since `{s}`: {e}")))?;
                let d = chrono::Duration::from_std(d)
                    .map_err(|e| PyValueError::new_err(e.to_string()))?;
                Ok::<_, PyErr>(chrono::Utc::now() - d)
            })
            .transpose()?;
        let group_by = match by {
            Some(by) => by.parse::<GroupBy>().map_err(PyValueError::new_err)?,
            None => GroupBy::default(),
        };
        let options = ReportOptions {
            since,
            until: None,
            group_by,
            top: 10,
        };
        let report = py
            .detach(|| {
                self.runtime.block_on(async {
                    cache.flush().await?;
                    cache
                        .report(
                            &options,
                            &ReportSource {
                                all_nodes: false,
                                cold_after: None,
                            },
                        )
                        .await
                })
            })
            .map_err(engine_error)?;
        serde_json::to_string(&report).map_err(engine_error)
    }

    /// Makes every write durable (and uploads, with S3).
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let cache = self.cache()?;
        py.detach(|| self.runtime.block_on(cache.flush()))
            .map_err(engine_error)
    }

    /// Closes the cache: drains the S3 outbox, flushes the disk tier. Later calls fail.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let taken = self
            .cache
            .write()
            .map_err(|_| engine_error("the cache's lock is poisoned"))?
            .take();
        if let Some(cache) = taken {
            py.detach(|| self.runtime.block_on(cache.close()))
                .map_err(engine_error)?;
        }
        Ok(())
    }

    /// Whether `close` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.cache.read().map(|c| c.is_none()).unwrap_or(true)
    }
}

fn seconds(s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s).map_err(|e| PyValueError::new_err(format!("{s} seconds: {e}")))
}

fn completion(
    response: &Value,
    provider: Option<String>,
    cost_usd: Option<f64>,
    tags: Option<Vec<String>>,
    ttl: Option<f64>,
    latency_ms: Option<u64>,
) -> PyResult<Completion> {
    let mut completion = Completion::from_value(response);
    if let Some(provider) = provider {
        completion = completion.provider(provider);
    }
    if let Some(cost) = cost_usd {
        completion = completion.cost_usd(cost);
    }
    if let Some(tags) = tags {
        completion = completion.tags(tags);
    }
    if let Some(ttl) = ttl {
        completion = completion.ttl(seconds(ttl)?);
    }
    if let Some(ms) = latency_ms {
        completion = completion.latency_ms(ms);
    }
    Ok(completion)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add("StrataError", m.py().get_type::<StrataError>())?;
    Ok(())
}
