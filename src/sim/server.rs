//! The simulator's accept loop.
//!
//! It mirrors [`crate::runtime::http::Server`] with one addition that the shared
//! server cannot express: a handler can ask for its connection to be closed
//! without any answer (the `cut_connection_after_processing_next` fault),
//! which is how a client meets a POST whose outcome it cannot know. Each
//! connection gets a [`Notify`]; the handler signals it and never returns,
//! and the connection task then drops the connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::handlers::SimHandler;

pub(crate) struct SimServer {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl SimServer {
    /// Serves on an already bound listener (the caller learned its address).
    pub fn start(listener: TcpListener, handler: Arc<SimHandler>) -> SimServer {
        let local_addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, handler, stopped));
        SimServer {
            local_addr,
            stop,
            task,
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets in-flight requests finish, and waits for them.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    handler: Arc<SimHandler>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(%error, "simulator accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                connections.spawn(serve_connection(stream, handler.clone(), stopped.clone()));
                while connections.try_join_next().is_some() {}
            }
            _ = async { let _ = stopped.wait_for(|s| *s).await; } => break,
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    handler: Arc<SimHandler>,
    mut stopped: watch::Receiver<bool>,
) {
    let cut = Arc::new(Notify::new());
    let service_cut = cut.clone();
    let service = hyper::service::service_fn(move |req| {
        let handler = handler.clone();
        let cut = service_cut.clone();
        async move { Ok::<_, Infallible>(handler.handle(req, &cut).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        // Dropping the connection closes the socket with no answer written.
        _ = cut.notified() => {}
        // The guard wait_for returns must not live across the awaits below.
        _ = async { let _ = stopped.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = cut.notified() => {}
            }
        }
    }
}
