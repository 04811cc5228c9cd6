//! Token counting the way the provider counts: the model's real tokenizer (o200k_base or
//! cl100k_base), through `bpe-openai` — a different implementation from the one
//! Tollgate's estimator uses, so the two check each other.

use serde_json::Value;

/// An OpenAI encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vocab {
    /// gpt-4o, gpt-4.1, o-series, gpt-5, and any model the provider does not know.
    O200k,
    /// gpt-4, gpt-3.5, text-embedding-*.
    Cl100k,
}

impl Vocab {
    /// The encoding the provider counts `model` with.
    pub fn for_model(model: &str) -> Vocab {
        const O200K: [&str; 8] = [
            "gpt-4o",
            "chatgpt-4o",
            "gpt-4.1",
            "gpt-4.5",
            "gpt-5",
            "o1",
            "o3",
            "o4",
        ];
        const CL100K: [&str; 4] = ["gpt-4", "gpt-3.5", "text-embedding", "davinci-002"];
        if O200K.iter().any(|p| model.starts_with(p)) {
            Vocab::O200k
        } else if CL100K.iter().any(|p| model.starts_with(p)) {
            Vocab::Cl100k
        } else {
            Vocab::O200k
        }
    }

    fn tokenizer(self) -> &'static bpe_openai::Tokenizer {
        match self {
            Vocab::O200k => bpe_openai::o200k_base(),
            Vocab::Cl100k => bpe_openai::cl100k_base(),
        }
    }

    /// Tokens in `text` in this encoding.
    pub fn count(self, text: &str) -> u64 {
        self.tokenizer().count(text) as u64
    }
}

/// Loads the tokenizers now, so the first request does not pay for them.
pub(crate) fn warm() {
    let _ = (Vocab::O200k.count("warm"), Vocab::Cl100k.count("warm"));
}

/// Tokens in `text`, exactly as o200k_base encodes it.
pub fn count(text: &str) -> u64 {
    Vocab::O200k.count(text)
}

/// An image costs what OpenAI charges for a low-detail one.
const IMAGE_TOKENS: u64 = 85;

/// Prompt tokens of a chat request, by OpenAI's published recipe: 3 per message, the
/// tokens of every string field (1 more for a `name`), 3 to prime the reply.
pub(crate) fn chat_prompt(vocab: Vocab, messages: &[Value]) -> u64 {
    let count = |s: &str| vocab.count(s);
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
pub(crate) fn embedding_input(vocab: Vocab, input: &Value) -> Option<u64> {
    match input {
        Value::String(s) => Some(vocab.count(s)),
        Value::Number(_) => Some(1),
        Value::Array(items) => items.iter().map(|i| embedding_input(vocab, i)).sum(),
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
            assert_eq!(Vocab::O200k.count(&text), n, "{text:?}");
            assert_eq!(Vocab::Cl100k.count(&text), n, "{text:?}");
        }
    }

    #[test]
    fn models_count_in_their_own_encoding() {
        assert_eq!(Vocab::for_model("gpt-4o-mini"), Vocab::O200k);
        assert_eq!(Vocab::for_model("gpt-4-turbo"), Vocab::Cl100k);
        assert_eq!(Vocab::for_model("text-embedding-3-small"), Vocab::Cl100k);
        assert_eq!(Vocab::for_model("o3-mini"), Vocab::O200k);
        let s = "Grüße aus Köln! 東京は晴れです。";
        assert_ne!(Vocab::O200k.count(s), Vocab::Cl100k.count(s));
    }

    #[test]
    fn chat_prompts_count_like_openai() {
        // 3 to prime the reply, 3 for the message, then its role and content.
        let msgs = json!([{"role": "user", "content": "Hello!"}]);
        let want = 3 + 3 + count("user") + count("Hello!");
        assert_eq!(chat_prompt(Vocab::O200k, msgs.as_array().unwrap()), want);
        let named = json!([{"role": "user", "name": "ann", "content": "Hi"}]);
        assert_eq!(
            chat_prompt(Vocab::O200k, named.as_array().unwrap()),
            3 + 3 + count("user") + count("ann") + 1 + count("Hi")
        );
        assert_eq!(count("Hello, world!"), 4);
    }

    #[test]
    fn embedding_inputs() {
        assert_eq!(
            embedding_input(Vocab::O200k, &json!("Hello, world!")),
            Some(4)
        );
        assert_eq!(
            embedding_input(Vocab::O200k, &json!([[1, 2, 3], [4]])),
            Some(4)
        );
        assert_eq!(embedding_input(Vocab::O200k, &json!({"x": 1})), None);
    }
}
