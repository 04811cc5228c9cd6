//! Token counting the way the provider counts: the real o200k_base tokenizer.

use serde_json::Value;

/// The o200k_base tokenizer, loaded once per process.
fn tokenizer() -> &'static bpe_openai::Tokenizer {
    bpe_openai::o200k_base()
}

/// Loads the tokenizer now, so the first request does not pay for it.
pub(crate) fn warm() {
    let _ = tokenizer().count("warm");
}

/// Tokens in `text`, exactly as o200k_base encodes it.
pub fn count(text: &str) -> u64 {
    tokenizer().count(text) as u64
}

/// An image costs what OpenAI charges for a low-detail one.
const IMAGE_TOKENS: u64 = 85;

/// Prompt tokens of a chat request, by OpenAI's published recipe: 3 per message, the
/// tokens of every string field (1 more for a `name`), 3 to prime the reply.
pub(crate) fn chat_prompt(messages: &[Value]) -> u64 {
    let mut total = 3;
    for m in messages {
        total += 3;
        let Some(obj) = m.as_object() else { continue };
        for (k, v) in obj {
            match v {
                Value::String(s) => {
                    total += count(s);
                    if k == "name" {
                        total += 1;
                    }
                }
                Value::Array(parts) if k == "content" => {
                    for p in parts {
                        match p.get("type").and_then(Value::as_str) {
                            Some("text") => {
                                total += p.get("text").and_then(Value::as_str).map_or(0, count)
                            }
                            Some(_) => total += IMAGE_TOKENS,
                            None => {}
                        }
                    }
                }
                Value::Null => {}
                other => total += count(&other.to_string()),
            }
        }
    }
    total
}

/// Tokens of an embeddings `input`: strings are encoded, token-id arrays counted.
pub(crate) fn embedding_input(input: &Value) -> Option<u64> {
    match input {
        Value::String(s) => Some(count(s)),
        Value::Number(_) => Some(1),
        Value::Array(items) => items.iter().map(embedding_input).sum(),
        _ => None,
    }
}

/// The words the provider answers with: each one token in o200k_base.
const WORDS: [&str; 8] = [
    " the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog",
];

/// An answer of exactly `n` tokens, as `n` one-token pieces.
pub(crate) fn answer_pieces(n: u64) -> impl Iterator<Item = &'static str> {
    (0..n as usize).map(|i| {
        let w = WORDS[i % WORDS.len()];
        if i == 0 {
            &w[1..]
        } else {
            w
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_have_exactly_the_tokens_asked_for() {
        for n in [0, 1, 2, 7, 8, 9, 100, 1000] {
            let text: String = answer_pieces(n).collect();
            assert_eq!(count(&text), n, "{text:?}");
        }
    }

    #[test]
    fn chat_prompts_count_like_openai() {
        // 3 to prime the reply, 3 for the message, then its role and content.
        let msgs = json!([{"role": "user", "content": "Hello!"}]);
        let want = 3 + 3 + count("user") + count("Hello!");
        assert_eq!(chat_prompt(msgs.as_array().unwrap()), want);
        let named = json!([{"role": "user", "name": "ann", "content": "Hi"}]);
        assert_eq!(
            chat_prompt(named.as_array().unwrap()),
            3 + 3 + count("user") + count("ann") + 1 + count("Hi")
        );
        assert_eq!(count("Hello, world!"), 4);
    }

    #[test]
    fn embedding_inputs() {
        assert_eq!(embedding_input(&json!("Hello, world!")), Some(4));
        assert_eq!(embedding_input(&json!([[1, 2, 3], [4]])), Some(4));
        assert_eq!(embedding_input(&json!({"x": 1})), None);
    }
}
