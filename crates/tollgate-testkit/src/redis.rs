//! Finding Redis for the tests that need it.
//!
//! Tests that need Redis call [`redis_url`]. It reads `REDIS_URL`; when the variable is
//! unset or the server does not answer a TCP connect, the test should skip — unless
//! `TOLLGATE_REQUIRE_REDIS=1` is set (as CI sets it), in which case it fails, so a missing
//! Redis can never turn CI green by skipping.
//!
//! ```
//! # fn demo() {
//! let Some(url) = tollgate_testkit::redis::redis_url("my_test") else { return };
//! // ... connect to `url` ...
//! # let _ = url; }
//! ```

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Whether CI demands Redis (`TOLLGATE_REQUIRE_REDIS=1`).
pub fn redis_required() -> bool {
    std::env::var("TOLLGATE_REQUIRE_REDIS").is_ok_and(|v| v == "1")
}

/// The Redis URL for `test`, or `None` (with a line on stderr saying the test skips).
///
/// # Panics
///
/// When Redis is required (`TOLLGATE_REQUIRE_REDIS=1`) and `REDIS_URL` is unset or
/// unreachable: a test tool failing the test it was asked to support.
pub fn redis_url(test: &str) -> Option<String> {
    let problem = match std::env::var("REDIS_URL") {
        Err(_) => "REDIS_URL is not set".to_owned(),
        Ok(url) => match reachable(&url) {
            Ok(()) => return Some(url),
            Err(why) => format!("Redis at {url} is unreachable: {why}"),
        },
    };
    if redis_required() {
        panic!("{test}: TOLLGATE_REQUIRE_REDIS=1 but {problem}");
    }
    eprintln!("skipping {test}: {problem} (set REDIS_URL=redis://127.0.0.1:6379 to run it)");
    None
}

/// A TCP connect to the URL's host and port (default 6379).
fn reachable(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
        .ok_or("the URL does not start with redis://")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let with_port = if host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host_port.to_owned()
    } else {
        format!("{host_port}:6379")
    };
    let addrs: Vec<_> = with_port
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .collect();
    let mut last = "no address".to_owned();
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_by_connecting() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(reachable(&format!("redis://127.0.0.1:{port}/0")), Ok(()));
        assert_eq!(
            reachable(&format!("redis://user:pw@127.0.0.1:{port}")),
            Ok(())
        );
        drop(listener);
        assert!(reachable(&format!("redis://127.0.0.1:{port}")).is_err());
        assert!(reachable("http://127.0.0.1:6379").is_err());
    }

    /// Under CI (`TOLLGATE_REQUIRE_REDIS=1`) this fails when Redis is missing; on a
    /// machine without Redis it skips with a line that says so.
    #[test]
    fn the_configured_redis_is_found_or_the_test_skips() {
        if let Some(url) = redis_url("the_configured_redis_is_found_or_the_test_skips") {
            assert_eq!(reachable(&url), Ok(()));
        }
    }
}
