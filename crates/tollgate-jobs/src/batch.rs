//! One line of an OpenAI Batch API input file, read and checked.
//!
//! A line is `{"custom_id": "...", "method": "POST", "url": "/v1/...", "body": {...}}`.
//! The reader is strict where OpenAI is: the line must be a JSON object, `custom_id` a
//! string, `url` the batch's endpoint and `body` an object. It is lenient in one place on
//! purpose: `method` may be left out (POST is the only method a batch runs) and is
//! compared without regard to case, since SDKs and hand-written files differ there.

use serde_json::Value;

/// A line that can run: its id, the model it names and the request body to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchLine {
    /// The caller's id for the line, echoed in the output file.
    pub custom_id: String,
    /// The body's `model`, empty when it names none.
    pub model: String,
    /// The request body, as compact JSON.
    pub body: String,
}

/// Why a line cannot run. The line fails alone; the batch goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineError {
    /// The line's `custom_id`, when it has one.
    pub custom_id: Option<String>,
    /// What is wrong, for the batch's error file.
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LineError {}

/// Reads one line of a batch file for `endpoint` (for example `/v1/chat/completions`).
/// Blank lines are the caller's to skip; any other input gives a line or an error, never a
/// panic.
///
/// ```
/// use tollgate_jobs::batch::parse_line;
///
/// let line = r#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":"x"}}"#;
/// let ok = parse_line(line, "/v1/embeddings").unwrap();
/// assert_eq!((ok.custom_id.as_str(), ok.model.as_str()), ("a", "m"));
/// assert!(parse_line(line, "/v1/chat/completions").is_err());
/// ```
pub fn parse_line(line: &str, endpoint: &str) -> Result<BatchLine, LineError> {
    let v: Value = match serde_json::from_str(line) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return Err(LineError {
                custom_id: None,
                message: "the line is not a JSON object".into(),
            })
        }
    };
    let custom_id = v["custom_id"].as_str().map(str::to_owned);
    let url = v["url"].as_str().unwrap_or_default();
    let method = v["method"].as_str().unwrap_or("POST");
    match (custom_id, &v["body"]) {
        (Some(custom_id), body @ Value::Object(_))
            if url == endpoint && method.eq_ignore_ascii_case("POST") =>
        {
            Ok(BatchLine {
                custom_id,
                model: body["model"].as_str().unwrap_or_default().to_owned(),
                body: body.to_string(),
            })
        }
        (custom_id, _) => Err(LineError {
            custom_id,
            message: format!(
                "a line needs `custom_id`, `method: POST`, `url: {endpoint}` and a `body` object"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_fails_alone_and_says_which() {
        let e = parse_line(
            r#"{"custom_id":"x","url":"/v1/embeddings"}"#,
            "/v1/embeddings",
        )
        .unwrap_err();
        assert_eq!(e.custom_id.as_deref(), Some("x"));
        assert!(parse_line("[1,2]", "/v1/embeddings").is_err());
        assert!(parse_line("{\"custom_id\":", "/v1/embeddings").is_err());
        let get = r#"{"custom_id":"x","method":"GET","url":"/v1/embeddings","body":{}}"#;
        assert!(parse_line(get, "/v1/embeddings").is_err());
    }

    #[test]
    fn method_may_be_left_out_or_in_any_case() {
        for m in ["", r#""method":"post","#] {
            let line =
                format!(r#"{{"custom_id":"x",{m}"url":"/v1/embeddings","body":{{"input":"a"}}}}"#);
            let ok = parse_line(&line, "/v1/embeddings").unwrap();
            assert_eq!(ok.model, "");
            assert_eq!(ok.body, r#"{"input":"a"}"#);
        }
    }
}
