//! Reading policy files: the annotated example, both formats, and the errors users see.

use std::time::Duration;

use tollgate::policy::{KeySpec, LimitMode, Partition, Policy, Rate, Store};

const EXAMPLE: &str = include_str!("../../../examples/tollgate.yaml");

#[test]
fn the_annotated_example_reads() {
    let p = Policy::from_yaml(EXAMPLE).unwrap();
    assert_eq!(p.primary.model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(p.fallbacks.len(), 1);
    assert_eq!(p.fallbacks[0].priority, Some(1));
    let rl = p.rate_limit.as_ref().unwrap();
    assert_eq!(
        rl.requests,
        Some(Rate {
            count: 600,
            per: Duration::from_secs(60)
        })
    );
    assert_eq!(
        rl.tokens,
        Some(Rate {
            count: 100_000,
            per: Duration::from_secs(60)
        })
    );
    assert_eq!(rl.key, Some(KeySpec::Global));
    assert_eq!(rl.mode, LimitMode::Wait);
    assert_eq!(rl.max_wait.unwrap().0, Duration::from_secs(30));
    let fb = p.fallbacks[0].rate_limit.as_ref().unwrap();
    assert_eq!(fb.requests.unwrap().count, 300);
    assert_eq!(p.retry.as_ref().unwrap().max_retries, Some(3));
    let cache = p.cache.as_ref().unwrap();
    assert_eq!(
        cache.partition,
        Some(Partition::By(KeySpec::Header(
            http::HeaderName::from_static("x-tenant-id")
        )))
    );
    assert_eq!(cache.max_size.unwrap().0, 64 << 20);
    assert_eq!(
        p.failover.wait_when_all_cooling.unwrap().0,
        Duration::from_secs(5)
    );
    assert_eq!(p.store, Store::Memory);
}

#[test]
fn toml_reads_the_same_policy() {
    let p = Policy::from_toml(
        r#"
store = "redis://127.0.0.1:6379/0"

[primary]
url = "http://127.0.0.1:8080"
model = "gpt-4o"

[[fallbacks]]
name = "mini"
url = "http://127.0.0.1:8081"
model = "gpt-4o-mini"

[rate_limit]
requests = "3000/min"
tokens = "250k/min"
mode = "refuse"
key = "header:x-tenant-id"

[retry]
max_retries = 5
backoff = "100ms"
"#,
    )
    .unwrap();
    assert_eq!(p.fallbacks[0].name.as_deref(), Some("mini"));
    let rl = p.rate_limit.unwrap();
    assert_eq!(rl.mode, LimitMode::Refuse);
    assert_eq!(rl.tokens.unwrap().count, 250_000);
    assert_eq!(
        p.retry.unwrap().backoff.unwrap().0,
        Duration::from_millis(100)
    );
    assert_eq!(p.store, Store::Redis("redis://127.0.0.1:6379/0".into()));
}

/// The error for `text`, which must not read.
fn yaml_err(text: &str) -> tollgate::policy::PolicyError {
    Policy::from_yaml(text).expect_err("should not read")
}

#[test]
fn an_unknown_field_is_an_error_with_its_line() {
    let e = yaml_err("primary:\n  url: http://h\nretry:\n  max_retires: 3\n");
    assert_eq!(e.line(), Some(4), "{e}");
    assert!(e.message().contains("max_retires"), "{e}");
    let e = yaml_err("primary:\n  url: http://h\nrate_limits:\n  requests: 10/s\n");
    assert_eq!(e.line(), Some(3), "{e}");
    assert!(e.message().contains("rate_limits"), "{e}");
}

#[test]
fn a_bad_value_names_the_field_the_line_and_what_was_expected() {
    let e = yaml_err("primary:\n  url: http://h\nrate_limit:\n  requests: 600\n");
    assert_eq!(e.line(), Some(4), "{e}");
    assert!(e.message().contains("rate_limit.requests"), "{e}");
    assert!(
        e.message().contains("600/min"),
        "the message shows the form: {e}"
    );

    let e = yaml_err("primary:\n  url: http://h\nretry:\n  backoff: soon\n");
    assert_eq!(e.line(), Some(4), "{e}");
    assert!(e.message().contains("retry.backoff"), "{e}");

    let e = yaml_err("primary:\n  url: http://h\nrate_limit:\n  mode: maybe\n");
    assert_eq!(e.line(), Some(4), "{e}");
    assert!(e.message().contains("rate_limit.mode"), "{e}");

    let e = yaml_err("primary:\n  url: http://h\nstore: postgres://db\n");
    assert_eq!(e.line(), Some(3), "{e}");
    assert!(e.message().contains("store"), "{e}");

    let e = Policy::from_toml("[primary]\nurl = \"http://h\"\n[retry]\nmax_retries = \"lots\"\n")
        .unwrap_err();
    assert_eq!(e.line(), Some(4), "{e}");
    assert!(e.message().contains("retry.max_retries"), "{e}");
}

#[test]
fn values_that_parse_but_make_no_sense_are_refused() {
    assert!(yaml_err("fallbacks: []\n").message().contains("primary"));
    assert!(yaml_err("primary: { url: \"ftp://h\" }\n")
        .message()
        .contains("http"));
    assert!(yaml_err(
        "primary: { url: \"http://h\" }\nfallbacks: [ { name: primary, url: \"http://g\" } ]\n"
    )
    .message()
    .contains("two backends"));
    assert!(
        yaml_err("primary: { url: \"http://h\", headers: { \"bad header\": x } }\n")
            .message()
            .contains("header")
    );
    assert!(
        yaml_err("primary: { url: \"http://h\" }\nretry: { factor: 0.5 }\n")
            .message()
            .contains("factor")
    );
}

#[test]
fn garbage_never_panics() {
    for text in [
        "",
        ":",
        "- - -",
        "primary: [",
        "{{{{",
        "primary: !!binary AAAA",
        "\u{0}",
        "a: &x [*x]",
    ] {
        let _ = Policy::from_yaml(text);
        let _ = Policy::from_toml(text);
    }
}
