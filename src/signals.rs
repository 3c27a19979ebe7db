//! Signal handlers registered when they are asked for, not at their first poll.
//!
//! `tokio::signal::ctrl_c()` registers its handler only when the future is first polled.
//! A command that announces itself (the gateway's "serving on" line) before that poll can
//! be sent a signal whose default action still stands, and the process ends without its
//! graceful stop. Each handler here is in place when its constructor returns.

/// One kind of signal, caught from the moment it is made.
pub(crate) struct Caught {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Caught {
    /// Ctrl-C (SIGINT). Must be called within the runtime.
    pub(crate) fn interrupt() -> Self {
        #[cfg(unix)]
        {
            Self::unix(tokio::signal::unix::SignalKind::interrupt())
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// SIGTERM, where there is one; elsewhere Ctrl-C. Must be called within the runtime.
    pub(crate) fn terminate() -> Self {
        #[cfg(unix)]
        {
            Self::unix(tokio::signal::unix::SignalKind::terminate())
        }
        #[cfg(not(unix))]
        Self {}
    }

    #[cfg(unix)]
    fn unix(kind: tokio::signal::unix::SignalKind) -> Self {
        Self {
            signal: tokio::signal::unix::signal(kind).ok(),
        }
    }

    /// Resolves at the next signal. Where the handler could not be installed, it waits for
    /// Ctrl-C as tokio's portable handler sees it; if even that fails, it never resolves.
    pub(crate) async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal {
            if signal.recv().await.is_some() {
                return;
            }
            return std::future::pending().await;
        }
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves at the first SIGTERM or Ctrl-C; both handlers are in place when this returns.
pub(crate) fn shutdown() -> impl std::future::Future<Output = ()> + Send {
    let mut interrupt = Caught::interrupt();
    let mut terminate = Caught::terminate();
    async move {
        tokio::select! {
            () = interrupt.recv() => {}
            () = terminate.recv() => {}
        }
    }
}
