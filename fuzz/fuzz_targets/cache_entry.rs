//! The Redis cache-entry decoder, on any bytes (what another version, another program or
//! a corrupted key left there): an entry or a miss, never a panic; and what it reads, it
//! writes back the same.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tollgate_redis::{decode_entry, encode_entry};

fuzz_target!(|data: &[u8]| {
    let Some(entry) = decode_entry(Bytes::copy_from_slice(data)) else {
        return;
    };
    let again = decode_entry(encode_entry(&entry)).expect("an entry it wrote reads back");
    assert_eq!(again.status, entry.status);
    assert_eq!(again.stream, entry.stream);
    assert_eq!(again.headers, entry.headers);
    assert_eq!(again.frames, entry.frames);
});
