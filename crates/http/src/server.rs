//! Serving the gateway: listeners, graceful shutdown, and the cache's close.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::time::Instant;

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin;
use crate::error::HttpError;
use crate::gateway::Gateway;

/// A gateway bound to its listeners, ready to run.
#[derive(Debug)]
pub struct Server {
    gateway: Gateway,
    listener: TcpListener,
    admin: Option<TcpListener>,
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Io {
            context: format!("binding the {what} to {addr}"),
            source,
        })
}

impl Server {
    /// Binds `[server] listen` (and `admin_listen`, when set).
    pub async fn bind(gateway: Gateway) -> Result<Server, HttpError> {
        let config = &gateway.shared().config;
        let listener = bind(config.listen, "gateway").await?;
        let admin = match config.admin_listen {
            Some(addr) => Some(bind(addr, "admin API").await?),
            None => None,
        };
        Ok(Server {
            gateway,
            listener,
            admin,
        })
    }

    /// Where the gateway listens (with the port the system chose for port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, HttpError> {
        self.listener.local_addr().map_err(|source| HttpError::Io {
            context: "reading the gateway's address".into(),
            source,
        })
    }

    /// Where the admin API listens.
    pub fn admin_addr(&self) -> Result<SocketAddr, HttpError> {
        match &self.admin {
            Some(admin) => admin.local_addr().map_err(|source| HttpError::Io {
                context: "reading the admin API's address".into(),
                source,
            }),
            None => self.local_addr(),
        }
    }

    /// Serves until `shutdown` completes; then stops accepting, lets the requests in flight
    /// finish (and the upstream calls they share) within `[server] shutdown_timeout`, and
    /// closes the cache: the S3 outbox is drained and the disk tier flushed.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), HttpError> {
        let shared = std::sync::Arc::clone(self.gateway.shared());
        let admin_router = admin::router(std::sync::Arc::clone(&shared));
        let (stop, stopping) = watch::channel(false);
        let mut servers = Vec::new();
        let main = match self.admin {
            Some(admin) => {
                servers.push(serve(admin, admin_router, stopping.clone()));
                self.gateway.router()
            }
            None => self.gateway.router().merge(admin_router),
        };
        servers.push(serve(self.listener, main, stopping));
        if let Some(proxy) = &shared.proxy {
            proxy.spawn_warmer(shared.closing.subscribe());
        }
        tracing::info!("gateway serving");
        shutdown.await;
        let deadline = Instant::now() + shared.config.shutdown_timeout;
        tracing::info!("shutting down: finishing requests in flight");
        let _ = stop.send(true);
        shared.closing.send_replace(true);
        for mut server in servers {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, &mut server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the listener failed"),
                Ok(Err(e)) => tracing::warn!(error = %e, "the listener's task failed"),
                Err(_) => {
                    tracing::warn!("requests still in flight at the shutdown deadline: dropped");
                    server.abort();
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if !shared.flights.wait_idle(left).await {
            tracing::warn!(
                calls = shared.flights.len(),
                "upstream calls still in flight at the shutdown deadline; their answers are not stored"
            );
        }
        let cache = self.gateway.cache().clone();
        drop(self.gateway);
        cache.close().await?;
        tracing::info!("gateway stopped; cache flushed");
        Ok(())
    }
}

fn serve(
    listener: TcpListener,
    router: Router,
    mut stopping: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    // Small answers wait for no delayed ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    let server = axum::serve(listener, service).with_graceful_shutdown(async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    });
    tokio::spawn(server.into_future())
}
