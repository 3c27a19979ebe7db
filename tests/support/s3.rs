//! A real S3 server for tests and benches: s3s-fs served in-process over HTTP on a loopback port,
//! with SigV4 authentication, listing from an ordered index of its keys (`s3_ordered.rs`) so a
//! page costs what it does on S3. With `STRATA_TEST_S3_ENDPOINT`, `STRATA_TEST_S3_BUCKET`,
//! `STRATA_TEST_S3_ACCESS_KEY`, `STRATA_TEST_S3_SECRET_KEY` and `STRATA_TEST_S3_REGION` set, the
//! same tests run against that server instead (MinIO, Garage, AWS), each under its own prefix.
//! An external server on plain HTTP is reached through a TCP relay on a loopback port, which
//! tests stop and restart to take the server away and bring it back, as they do the in-process
//! one. To refuse some requests and pass the rest ([`Fault::RefuseDeletes`] and the like), the
//! front parses HTTP and forwards what it lets through, to s3s-fs or to the external server.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper_util::client::legacy::Client as LegacyClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use strata::tiers::S3Config;
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

#[path = "s3_ordered.rs"]
mod ordered;

const ACCESS_KEY: &str = "strata-test";
const SECRET_KEY: &str = "strata-test-secret";

static PREFIXES: AtomicU64 = AtomicU64::new(0);

/// An S3 server for one test: in-process, or external; stoppable and restartable on the same
/// port unless it is external over HTTPS.
pub struct TestS3 {
    /// Endpoint URL.
    pub endpoint: String,
    /// Bucket.
    pub bucket: String,
    /// Region.
    pub region: String,
    /// Access key.
    pub access_key: String,
    /// Secret key.
    pub secret_key: String,
    /// A prefix no other test uses.
    pub prefix: String,
    front: Option<Front>,
}

/// The loopback port the tests talk to, and what answers on it.
struct Front {
    addr: SocketAddr,
    backend: Backend,
    accept: Option<JoinHandle<()>>,
}

enum Backend {
    /// s3s-fs in this process, storing under this directory.
    InProcess(TempDir),
    /// A relay to an external server at this `host:port`.
    Relay(String),
}

/// How [`TestS3::misbehave`] has the server's port answer.
pub enum Fault {
    /// Accept connections and never answer: a server that hangs.
    Stall,
    /// Answer every request with this HTTP status and an S3 error document (503: overloaded).
    Status(u16),
    /// Answer 200 with a body that never ends, one byte every 100 ms (fast enough for the
    /// SDK's stalled-stream protection), declaring this length, or none (chunked).
    Trickle(Option<u64>),
    /// Serve as usual, except that a request whose body is
    /// larger than this many bytes gets 413 and an HTML page, as from a proxy in front.
    RefuseBodiesOver(u64),
    /// Serve as usual, except that a write with `If-Match` or
    /// `If-None-Match` gets 501 `NotImplemented`, as from a store without conditional writes.
    RefuseConditionalWrites,
    /// Serve as usual, except that DeleteObject and DeleteObjects
    /// get 503 `ServiceUnavailable`.
    RefuseDeletes,
    /// Serve as usual, except that a PutObject whose path contains this text gets a lasting
    /// 400 `InvalidRequest` (a store that will not take those objects as they are).
    RejectPutsContaining(String),
    /// Serve as usual, except that each listing (ListObjectsV2) is answered after this long
    /// (a bucket so large that a command over it can be stopped part-way); the query of each is
    /// added to the list as it arrives.
    SlowLists(Duration, std::sync::Arc<std::sync::Mutex<Vec<String>>>),
}

impl TestS3 {
    /// Starts the in-process server, or uses the external one the environment names.
    pub async fn start() -> Result<TestS3> {
        let unique = format!(
            "t{}-{}",
            std::process::id(),
            PREFIXES.fetch_add(1, Ordering::Relaxed)
        );
        if let Ok(endpoint) = std::env::var("STRATA_TEST_S3_ENDPOINT") {
            let var = |name: &str| std::env::var(name).with_context(|| format!("{name} not set"));
            let mut s3 = TestS3 {
                endpoint: endpoint.clone(),
                bucket: var("STRATA_TEST_S3_BUCKET")?,
                region: var("STRATA_TEST_S3_REGION").unwrap_or_else(|_| "us-east-1".into()),
                access_key: var("STRATA_TEST_S3_ACCESS_KEY")?,
                secret_key: var("STRATA_TEST_S3_SECRET_KEY")?,
                prefix: format!("strata-test/{unique}"),
                front: None,
            };
            // Plain HTTP can be relayed byte for byte (SigV4 signs the Host header the client
            // sends, which reaches the server unchanged); HTTPS cannot, so such a server cannot
            // be stopped.
            if let Some(upstream) = endpoint
                .strip_prefix("http://")
                .map(|rest| rest.split('/').next().unwrap_or(rest))
            {
                // `host:port`, `[v6]:port`; a bare host or `[v6]` gets HTTP's port.
                let has_port = match upstream.rsplit_once(']') {
                    Some((_, after)) => after.starts_with(':'),
                    None => upstream.contains(':'),
                };
                let upstream = if has_port {
                    upstream.to_string()
                } else {
                    format!("{upstream}:80")
                };
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                s3.endpoint = format!("http://{addr}");
                s3.front = Some(Front {
                    addr,
                    backend: Backend::Relay(upstream),
                    accept: None,
                });
                s3.serve(listener)?;
            }
            return Ok(s3);
        }
        // s3s-fs keeps every object's attributes as files in one directory; on tmpfs (when the
        // machine has one) the server's own file work stops dominating what the tests measure.
        let shm = std::path::Path::new("/dev/shm");
        let root = if shm.is_dir() {
            tempfile::tempdir_in(shm).or_else(|_| tempfile::tempdir())?
        } else {
            tempfile::tempdir()?
        };
        let bucket = "strata-test".to_string();
        std::fs::create_dir(root.path().join(&bucket))?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut s3 = TestS3 {
            endpoint: format!("http://{addr}"),
            bucket,
            region: "us-east-1".into(),
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            prefix: format!("strata/{unique}"),
            front: Some(Front {
                addr,
                backend: Backend::InProcess(root),
                accept: None,
            }),
        };
        s3.serve(listener)?;
        Ok(s3)
    }

    /// Whether this is the in-process server.
    pub fn is_local(&self) -> bool {
        matches!(
            self.front,
            Some(Front {
                backend: Backend::InProcess(_),
                ..
            })
        )
    }

    /// Whether tests can take this server away, bring it back and make it misbehave
    /// ([`TestS3::stop`], [`TestS3::restart`], [`TestS3::misbehave`]): the in-process one, or
    /// an external one over plain HTTP.
    pub fn can_stop(&self) -> bool {
        self.front.is_some()
    }

    fn serve(&mut self, listener: TcpListener) -> Result<()> {
        let front = self
            .front
            .as_mut()
            .context("an external server over HTTPS")?;
        front.accept = Some(match &front.backend {
            Backend::InProcess(root) => {
                let service = s3s_service(root)?;
                accept_loop(listener, move |socket| {
                    let service = service.clone();
                    async move {
                        let _ = ConnBuilder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(socket), service)
                            .await;
                    }
                })
            }
            Backend::Relay(upstream) => {
                let upstream = upstream.clone();
                accept_loop(listener, move |mut socket| {
                    let upstream = upstream.clone();
                    async move {
                        if let Ok(mut server) = TcpStream::connect(&upstream).await {
                            let _ = server.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut socket, &mut server).await;
                        }
                    }
                })
            }
        });
        Ok(())
    }

    /// Stops the server: the port refuses connections until [`TestS3::restart`]. Connections
    /// open at the time are cut.
    pub async fn stop(&mut self) -> Result<()> {
        let front = self
            .front
            .as_mut()
            .context("an external server over HTTPS")?;
        if let Some(task) = front.accept.take() {
            task.abort();
            let _ = task.await;
        }
        Ok(())
    }

    /// Serves again on the same port, with the same stored objects.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        let listener = self.rebind().await?;
        self.serve(listener)
    }

    /// Keeps the port open but has it misbehave, until [`TestS3::restart`] serves again.
    pub async fn misbehave(&mut self, fault: Fault) -> Result<()> {
        self.stop().await?;
        let listener = self.rebind().await?;
        let front = self
            .front
            .as_mut()
            .context("an external server over HTTPS")?;
        front.accept = Some(match fault {
            Fault::Stall => accept_loop(listener, |socket| async move {
                let _held = socket;
                std::future::pending::<()>().await
            }),
            Fault::Status(code) => accept_loop(listener, move |socket| async move {
                let status = hyper::StatusCode::from_u16(code)
                    .unwrap_or(hyper::StatusCode::SERVICE_UNAVAILABLE);
                let service = hyper::service::service_fn(move |_request| async move {
                    let body = format!(
                        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code>\
                         <Message>injected by the test</Message></Error>",
                        status
                            .canonical_reason()
                            .unwrap_or("Error")
                            .replace(' ', "")
                    );
                    let mut response = hyper::Response::new(body);
                    *response.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = ConnBuilder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            }),
            Fault::RefuseBodiesOver(limit) => {
                serve_refusing(listener, PassThrough::to(&front.backend)?, move |request| {
                    let length = request
                        .headers()
                        .get(hyper::header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                    length.is_some_and(|n| n > limit).then_some((
                        hyper::StatusCode::PAYLOAD_TOO_LARGE,
                        "<html><body><h1>413 Request Entity Too Large</h1></body></html>",
                    ))
                })
            }
            Fault::RefuseConditionalWrites => {
                serve_refusing(listener, PassThrough::to(&front.backend)?, |request| {
                    let headers = request.headers();
                    let conditional = headers.contains_key(hyper::header::IF_MATCH)
                        || headers.contains_key(hyper::header::IF_NONE_MATCH);
                    (request.method() == hyper::Method::PUT && conditional).then_some((
                        hyper::StatusCode::NOT_IMPLEMENTED,
                        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error>\
                         <Code>NotImplemented</Code><Message>conditional writes</Message></Error>",
                    ))
                })
            }
            Fault::RefuseDeletes => {
                serve_refusing(listener, PassThrough::to(&front.backend)?, |request| {
                    let bulk = request
                        .uri()
                        .query()
                        .is_some_and(|q| q.split('&').any(|p| p == "delete" || p == "delete="));
                    let delete = request.method() == hyper::Method::DELETE
                        || (request.method() == hyper::Method::POST && bulk);
                    delete.then_some((
                        hyper::StatusCode::SERVICE_UNAVAILABLE,
                        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error>\
                         <Code>ServiceUnavailable</Code><Message>no deletes</Message></Error>",
                    ))
                })
            }
            Fault::RejectPutsContaining(text) => {
                serve_refusing(listener, PassThrough::to(&front.backend)?, move |request| {
                    (request.method() == hyper::Method::PUT
                        && request.uri().path().contains(text.as_str()))
                    .then_some((
                        hyper::StatusCode::BAD_REQUEST,
                        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error>\
                         <Code>InvalidRequest</Code><Message>not these</Message></Error>",
                    ))
                })
            }
            Fault::SlowLists(delay, seen) => {
                serve_judging(listener, PassThrough::to(&front.backend)?, move |request| {
                    let query = request.uri().query().unwrap_or_default();
                    let listing = request.method() == hyper::Method::GET
                        && query.split('&').any(|p| p == "list-type=2");
                    if !listing {
                        return Judged::Pass;
                    }
                    if let Ok(mut seen) = seen.lock() {
                        seen.push(query.to_owned());
                    }
                    Judged::Delay(delay)
                })
            }
            Fault::Trickle(declared) => accept_loop(listener, move |socket| async move {
                let service = hyper::service::service_fn(move |_request| async move {
                    let bytes = futures::stream::unfold((), |()| async {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let frame = hyper::body::Frame::data(bytes::Bytes::from_static(b"x"));
                        Some((Ok::<_, std::convert::Infallible>(frame), ()))
                    });
                    let mut response = hyper::Response::new(http_body_util::StreamBody::new(bytes));
                    if let Some(length) = declared {
                        response
                            .headers_mut()
                            .insert(hyper::header::CONTENT_LENGTH, length.into());
                    }
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = ConnBuilder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            }),
        });
        Ok(())
    }

    /// A listener on this server's port again (the old one may take a moment to let it go).
    async fn rebind(&self) -> Result<TcpListener> {
        let addr = self
            .front
            .as_ref()
            .context("an external server over HTTPS")?
            .addr;
        let mut last = None;
        for _ in 0..50 {
            match TcpListener::bind(addr).await {
                Ok(listener) => return Ok(listener),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.map_or_else(|| anyhow::anyhow!("cannot bind"), Into::into))
    }

    /// Whether the server refuses a PutObject whose condition fails: `If-None-Match: *` on a
    /// key that exists, and `If-Match` with an ETag the object does not have. s3s-fs, AWS S3
    /// and MinIO do; Garage 2.5 ignores both headers on PutObject. strata uses them where they
    /// work and does not depend on them.
    pub async fn refuses_failed_conditions(&self) -> Result<bool> {
        let client = self.client().await;
        let key = format!("{}/probe/conditional-put", self.prefix);
        let put = || {
            client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .body(aws_sdk_s3::primitives::ByteStream::from_static(b"probe"))
        };
        put().send().await?;
        let absent = refused(put().if_none_match("*").send().await)?;
        let stale = refused(put().if_match("\"stale\"").send().await)?;
        client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await?;
        Ok(absent && stale)
    }

    /// Settings for an S3 tier on this server, under this test's prefix.
    pub fn config(&self) -> S3Config {
        let mut config = S3Config::new(self.bucket.clone());
        config.endpoint = Some(self.endpoint.clone());
        config.region = self.region.clone();
        config.prefix = self.prefix.clone();
        config.access_key = Some(self.access_key.clone());
        config.secret_key = Some(self.secret_key.clone());
        config.connect_timeout = Duration::from_millis(500);
        config.operation_timeout = Duration::from_secs(3);
        config.max_attempts = 2;
        config
    }

    /// A raw client for checking what landed in the bucket.
    pub async fn client(&self) -> aws_sdk_s3::Client {
        self.config().client().await
    }

    /// Every key under this test's prefix, sorted.
    pub async fn keys(&self) -> Result<Vec<String>> {
        let client = self.client().await;
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let page = client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(format!("{}/", self.prefix))
                .set_continuation_token(token)
                .send()
                .await?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_string)),
            );
            match page.next_continuation_token() {
                Some(next) => token = Some(next.to_string()),
                None => break,
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// The body of one object.
    pub async fn object(&self, key: &str) -> Result<Vec<u8>> {
        let out = self
            .client()
            .await
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await?;
        Ok(out.body.collect().await?.to_vec())
    }

    /// A config file (TOML) pointing strata at this server, with its disk tier in `disk`.
    pub fn config_toml(&self, disk: &std::path::Path) -> String {
        format!(
            "[disk]\npath = {disk:?}\n\n[s3]\nenabled = true\nbucket = {bucket:?}\n\
             endpoint = {endpoint:?}\nregion = {region:?}\nprefix = {prefix:?}\n\
             access_key = {ak:?}\nsecret_key = {sk:?}\n",
            disk = disk.display().to_string(),
            bucket = self.bucket,
            endpoint = self.endpoint,
            region = self.region,
            prefix = self.prefix,
            ak = self.access_key,
            sk = self.secret_key,
        )
    }
}

/// A response body of any origin: s3s's, the upstream server's, or a refusal's.
type AnyBody = BoxBody<bytes::Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Where a refusing front sends the requests it lets through.
#[derive(Clone)]
enum PassThrough {
    /// The in-process s3s-fs.
    S3s(s3s::service::S3Service),
    /// The external server, over HTTP. Requests keep the Host header the client signed.
    Upstream {
        client: Box<LegacyClient<HttpConnector, hyper::body::Incoming>>,
        upstream: String,
    },
}

impl PassThrough {
    fn to(backend: &Backend) -> Result<PassThrough> {
        Ok(match backend {
            Backend::InProcess(root) => PassThrough::S3s(s3s_service(root)?),
            Backend::Relay(upstream) => PassThrough::Upstream {
                client: Box::new(LegacyClient::builder(TokioExecutor::new()).build_http()),
                upstream: upstream.clone(),
            },
        })
    }

    async fn call(
        &self,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<AnyBody> {
        match self {
            PassThrough::S3s(service) => {
                match hyper::service::Service::call(service, request).await {
                    Ok(response) => response.map(|body| body.map_err(Into::into).boxed()),
                    Err(e) => answer(hyper::StatusCode::INTERNAL_SERVER_ERROR, format!("{e:?}")),
                }
            }
            PassThrough::Upstream { client, upstream } => {
                let (mut parts, body) = request.into_parts();
                let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                match format!("http://{upstream}{path}").parse() {
                    Ok(uri) => parts.uri = uri,
                    Err(e) => return answer(hyper::StatusCode::BAD_GATEWAY, e.to_string()),
                }
                match client
                    .request(hyper::Request::from_parts(parts, body))
                    .await
                {
                    Ok(response) => response.map(|body| body.map_err(Into::into).boxed()),
                    Err(e) => answer(hyper::StatusCode::BAD_GATEWAY, e.to_string()),
                }
            }
        }
    }
}

/// A response of `status` with `body`.
fn answer(status: hyper::StatusCode, body: String) -> hyper::Response<AnyBody> {
    let body = Full::new(bytes::Bytes::from(body)).map_err(|never| match never {});
    let mut response = hyper::Response::new(body.boxed());
    *response.status_mut() = status;
    response
}

/// What a misbehaving front does with one request.
enum Judged {
    /// Passes it on.
    Pass,
    /// Answers it with this status and body itself.
    Refuse(hyper::StatusCode, &'static str),
    /// Passes it on after this long.
    Delay(Duration),
}

/// Serves `inner`, except that a request `refuse` has an answer for gets that answer.
fn serve_refusing(
    listener: TcpListener,
    inner: PassThrough,
    refuse: impl Fn(&hyper::Request<hyper::body::Incoming>) -> Option<(hyper::StatusCode, &'static str)>
    + Clone
    + Send
    + Sync
    + 'static,
) -> JoinHandle<()> {
    serve_judging(listener, inner, move |request| {
        refuse(request).map_or(Judged::Pass, |(status, body)| Judged::Refuse(status, body))
    })
}

/// Serves `inner` on `listener`, each request as `judge` says.
fn serve_judging(
    listener: TcpListener,
    inner: PassThrough,
    judge: impl Fn(&hyper::Request<hyper::body::Incoming>) -> Judged + Clone + Send + Sync + 'static,
) -> JoinHandle<()> {
    accept_loop(listener, move |socket| {
        let (inner, judge) = (inner.clone(), judge.clone());
        let judging =
            hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let (inner, judged) = (inner.clone(), judge(&request));
                async move {
                    Ok::<_, std::convert::Infallible>(match judged {
                        Judged::Refuse(status, body) => answer(status, body.to_string()),
                        Judged::Delay(delay) => {
                            tokio::time::sleep(delay).await;
                            inner.call(request).await
                        }
                        Judged::Pass => inner.call(request).await,
                    })
                }
            });
        async move {
            let _ = ConnBuilder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(socket), judging)
                .await;
        }
    })
}

/// s3s-fs over the directory `root`, with the tests' credentials.
fn s3s_service(root: &TempDir) -> Result<s3s::service::S3Service> {
    let mut builder = S3ServiceBuilder::new(ordered::Ordered::new(root.path())?);
    builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    Ok(builder.build())
}

/// Accepts connections on `listener` until the task is aborted, handling each with `handle`.
/// Dropping the set of connections (when the task is aborted) cuts every open one.
fn accept_loop<F, Fut>(listener: TcpListener, handle: F) -> JoinHandle<()>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((socket, _)) = accepted else { continue };
                    // Without it, every response waits ~40 ms on a delayed ACK.
                    let _ = socket.set_nodelay(true);
                    connections.spawn(handle(socket));
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    })
}

/// Whether a conditional PutObject was refused (412, or 409 as AWS answers a race): `Ok(false)`
/// if it went through, an error for any other failure.
fn refused<T, E>(
    result: Result<T, aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>>,
) -> Result<bool>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match result {
        Ok(_) => Ok(false),
        Err(e) => match e.raw_response().map(|r| r.status().as_u16()) {
            Some(412 | 409) => Ok(true),
            _ => Err(anyhow::Error::new(e)),
        },
    }
}
