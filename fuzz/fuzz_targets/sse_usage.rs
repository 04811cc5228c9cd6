//! The usage scanner, on any body cut into any frames: never a panic, and the usage it
//! finds does not depend on where the frames were cut.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tollgate_core::usage::{Usage, UsageScanner};

fn scan(mut scanner: UsageScanner, frames: &[Bytes]) -> Option<Usage> {
    for f in frames {
        scanner.feed(f);
        let _ = scanner.usage_so_far();
    }
    scanner.finish()
}

fuzz_target!(|data: &[u8]| {
    // The first byte says how many cut points follow; the rest is the body.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len());
    let (cuts, body) = rest.split_at(n);
    let body = Bytes::copy_from_slice(body);
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|&c| {
            if body.is_empty() {
                0
            } else {
                usize::from(c) % (body.len() + 1)
            }
        })
        .collect();
    at.sort_unstable();
    let mut frames = Vec::new();
    let mut from = 0;
    for &to in at.iter().chain(std::iter::once(&body.len())) {
        frames.push(body.slice(from..to));
        from = to;
    }
    let whole = std::slice::from_ref(&body);
    assert_eq!(
        scan(UsageScanner::sse(), whole),
        scan(UsageScanner::sse(), &frames)
    );
    assert_eq!(
        scan(UsageScanner::json(1 << 20), whole),
        scan(UsageScanner::json(1 << 20), &frames)
    );
    let _ = Usage::from_json_bytes(&body);
});
