//! The gateway config loader, YAML and TOML, on any text: a config or an error, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_gateway::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::from_yaml(text);
    let _ = Config::from_toml(text);
});
