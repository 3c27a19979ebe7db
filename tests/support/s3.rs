//! A real S3 server for tests and benches: s3s-fs served in-process over HTTP on a loopback
//! port, with SigV4 authentication. With `STRATA_TEST_S3_ENDPOINT`, `STRATA_TEST_S3_BUCKET`,
//! `STRATA_TEST_S3_ACCESS_KEY`, `STRATA_TEST_S3_SECRET_KEY` and `STRATA_TEST_S3_REGION` set, the
//! same tests run against that server instead (MinIO, Garage, AWS), each under its own prefix.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use strata::tiers::S3Config;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

const ACCESS_KEY: &str = "strata-test";
const SECRET_KEY: &str = "strata-test-secret";

static PREFIXES: AtomicU64 = AtomicU64::new(0);

/// An S3 server for one test: in-process (stoppable, restartable on the same port) or external.
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
    local: Option<Local>,
}

struct Local {
    root: TempDir,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
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
            return Ok(TestS3 {
                endpoint,
                bucket: var("STRATA_TEST_S3_BUCKET")?,
                region: var("STRATA_TEST_S3_REGION").unwrap_or_else(|_| "us-east-1".into()),
                access_key: var("STRATA_TEST_S3_ACCESS_KEY")?,
                secret_key: var("STRATA_TEST_S3_SECRET_KEY")?,
                prefix: format!("strata-test/{unique}"),
                local: None,
            });
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
            local: Some(Local {
                root,
                addr,
                accept: None,
            }),
        };
        s3.serve(listener)?;
        Ok(s3)
    }

    /// Whether this is the in-process server (which tests may stop and restart).
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    fn serve(&mut self, listener: TcpListener) -> Result<()> {
        let local = self.local.as_mut().context("not an in-process server")?;
        let fs = s3s_fs::FileSystem::new(local.root.path())
            .map_err(|e| anyhow::anyhow!("s3s-fs: {e:?}"))?;
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        local.accept = Some(tokio::spawn(async move {
            // Dropping this set (when the task is aborted) aborts every open connection.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((socket, _)) = accepted else { continue };
                        // Without it, every response waits ~40 ms on a delayed ACK.
                        let _ = socket.set_nodelay(true);
                        let service = service.clone();
                        connections.spawn(async move {
                            let _ = ConnBuilder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(socket), service)
                                .await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        }));
        Ok(())
    }

    /// Stops the in-process server: the port refuses connections until [`TestS3::restart`].
    pub async fn stop(&mut self) -> Result<()> {
        let local = self.local.as_mut().context("not an in-process server")?;
        if let Some(task) = local.accept.take() {
            task.abort();
            let _ = task.await;
        }
        Ok(())
    }

    /// Serves again on the same port, with the same stored objects.
    pub async fn restart(&mut self) -> Result<()> {
        let addr = self
            .local
            .as_ref()
            .context("not an in-process server")?
            .addr;
        let mut last = None;
        for _ in 0..50 {
            match TcpListener::bind(addr).await {
                Ok(listener) => return self.serve(listener),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.map_or_else(|| anyhow::anyhow!("cannot bind"), Into::into))
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
