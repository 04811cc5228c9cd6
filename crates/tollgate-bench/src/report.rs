//! The readable table and the machine-readable last line every scenario prints.

/// Prints `rows` as an aligned two-column table under `title`.
pub(crate) fn table(title: &str, rows: &[(&str, String)]) {
    println!("\n{title}");
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("{}", "-".repeat(title.len().max(width + 24)));
    for (k, v) in rows {
        println!("{k:<width$}  {v}");
    }
}

/// Prints the `RESULT <scenario> key=value ...` line; it must be the last line printed.
pub(crate) fn result_line(scenario: &str, pairs: &[(&str, String)]) {
    let kv: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("RESULT {scenario} {}", kv.join(" "));
}
