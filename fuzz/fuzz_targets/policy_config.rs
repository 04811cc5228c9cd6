//! The policy file loader, YAML and TOML, on any text: a policy or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::policy::Policy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Policy::from_yaml(text);
    let _ = Policy::from_toml(text);
});
