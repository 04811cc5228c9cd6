//! A simulated LLM provider for tests, examples and benchmarks.
//!
//! [`Provider`] is a real HTTP/1.1 server (hyper) on `127.0.0.1`, OpenAI-compatible enough
//! to stand in for the real thing:
//!
//! - `POST /v1/chat/completions` answers with a completion and an exact `usage`: prompt
//!   tokens counted with the real o200k_base tokenizer by OpenAI's recipe, completion
//!   tokens from the answer it writes (16 tokens by default; `max_tokens` /
//!   `max_completion_tokens` cap it, and the header `x-testkit-completion-tokens` sets
//!   it). `stream: true` answers SSE chunks, paced by [`ProviderBuilder::chunk_delay`], with
//!   the usage chunk when `stream_options.include_usage` is set.
//! - `POST /v1/embeddings` answers with small vectors and `usage`.
//! - Per API key it enforces RPM and TPM with its own accounting (a token bucket per limit
//!   that holds a minute's quota and refills continuously, as OpenAI's does), independent
//!   of Tollgate's code so that it judges it fairly. Over a limit it answers 429 with
//!   `Retry-After`, `retry-after-ms`, `x-ratelimit-*` and an OpenAI error body; its 200s
//!   carry the `x-ratelimit-*` headers too. A request is charged its prompt tokens plus
//!   the completion tokens it will be answered with, both or neither.
//! - It injects faults on request or at random: see [`Faults`].
//! - It counts what it sees, per key and in total: [`Provider::stats`],
//!   [`Provider::key_stats`], and `GET /testkit/stats` as JSON.
//!
//! Time is tokio's, so a test on a paused clock controls the provider's refills too.
//!
//! The binary `tollgate-provider` runs the same server from the command line.
//!
//! ```no_run
//! use tollgate_testkit::Provider;
//!
//! # #[tokio::main] async fn main() -> std::io::Result<()> {
//! let provider = Provider::builder().rpm(60).tpm(100_000).spawn().await?;
//! println!("POST {}/v1/chat/completions", provider.url());
//! // ... send requests ...
//! assert_eq!(provider.stats().rate_limited, 0);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod api;
pub mod body;
mod config;
pub mod counters;
pub mod job_store;
mod limits;
pub mod redis;
mod stats;
pub mod tokens;
pub mod workload;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

pub use api::{COMPLETION_TOKENS_HEADER, FAULT_HEADER};
pub use config::{Faults, ProviderConfig};
pub use stats::Stats;

/// Builds a [`Provider`]. Every setting has a default: no limits, 16-token answers, no
/// delays, no faults.
#[derive(Clone, Debug)]
pub struct ProviderBuilder {
    config: ProviderConfig,
    listen: SocketAddr,
}

impl ProviderBuilder {
    /// Requests per minute allowed to each API key.
    pub fn rpm(mut self, n: u64) -> Self {
        self.config.rpm = Some(n);
        self
    }

    /// At most `n` requests at once per API key (the whole window's RPM unless set): the
    /// bucket refills at the RPM's pace but holds only `n`, as providers that quantise
    /// minute limits into shorter windows do. `x-ratelimit-limit-requests` still says the
    /// RPM.
    pub fn burst(mut self, n: u64) -> Self {
        self.config.burst = Some(n);
        self
    }

    /// Tokens per minute allowed to each API key.
    pub fn tpm(mut self, n: u64) -> Self {
        self.config.tpm = Some(n);
        self
    }

    /// The window RPM and TPM are counted over (a minute unless changed; shorter windows
    /// make quick tests).
    pub fn window(mut self, window: Duration) -> Self {
        self.config.window = window;
        self
    }

    /// Tokens in an answer when neither the request's cap nor its
    /// `x-testkit-completion-tokens` header says otherwise.
    pub fn completion_tokens(mut self, n: u64) -> Self {
        self.config.completion_tokens = n;
        self
    }

    /// The pause between two SSE chunks of a streamed answer.
    pub fn chunk_delay(mut self, delay: Duration) -> Self {
        self.config.chunk_delay = delay;
        self
    }

    /// Tokens per SSE content chunk (1 by default).
    pub fn tokens_per_chunk(mut self, n: u64) -> Self {
        self.config.tokens_per_chunk = n.max(1);
        self
    }

    /// Time every admitted request takes before its answer starts.
    pub fn latency(mut self, latency: Duration) -> Self {
        self.config.latency = latency;
        self
    }

    /// Faults injected at random.
    pub fn faults(mut self, faults: Faults) -> Self {
        self.config.faults = faults;
        self
    }

    /// The seed of the fault draws, for runs that repeat exactly.
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = seed;
        self
    }

    /// The address to listen on (`127.0.0.1:0`, a free port, unless changed).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Binds the address and starts serving on the current tokio runtime.
    pub async fn spawn(self) -> io::Result<Provider> {
        tokens::warm();
        let listener = TcpListener::bind(self.listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(api::State::new(self.config));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, Arc::clone(&state), stopped));
        Ok(Provider {
            addr,
            state,
            stop: Some(stop),
            task,
        })
    }
}

/// A running simulated provider. Dropping it stops the server and closes its connections.
#[derive(Debug)]
pub struct Provider {
    addr: SocketAddr,
    state: Arc<api::State>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for api::State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

impl Provider {
    /// A builder with the defaults.
    pub fn builder() -> ProviderBuilder {
        ProviderBuilder {
            config: ProviderConfig::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the base URL to send requests to.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Counters over every key.
    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    /// Counters of one API key (the raw key, as sent; `anonymous` for requests without
    /// one).
    pub fn key_stats(&self, api_key: &str) -> Stats {
        self.state.key_stats(api_key)
    }

    /// Changes the faults from now on, for an outage and its end in the middle of a run:
    /// `set_faults(Faults { unavailable_rate: 1.0, ..Faults::default() })`, then
    /// `set_faults(Faults::default())`.
    pub fn set_faults(&self, faults: Faults) {
        self.state.set_faults(faults);
    }

    /// Stops accepting, closes every connection, and waits for the server to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, state: Arc<api::State>, mut stopped: oneshot::Receiver<()>) {
    // Dropping the set (when this task ends or is aborted) aborts every connection.
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: back off briefly rather than spin.
                tracing::warn!(error = %e, "simulated provider: accept failed");
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { state.handle(req).await }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        while conns.try_join_next().is_some() {}
    }
}
