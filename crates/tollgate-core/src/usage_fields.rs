//! The parts of an answer (or of one SSE event) that can hold its usage, read straight
//! from the JSON without building a `serde_json::Value`: known fields are kept, all else
//! (the answer's text above all) is skipped without being allocated.
//!
//! Written by hand rather than derived: a derived struct refuses a value of an unexpected
//! type (`"usage": null`, a count sent as a float) and a key sent twice, where reading a
//! `Value` and asking `as_u64` takes the last and ignores what is not a count. These
//! types keep the `Value` reading's every answer, which the usage tests hold them to.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// A field that should hold an object: absent, present as something else, or the object's
/// known fields.
#[derive(Default)]
pub(crate) enum Obj<T> {
    #[default]
    Absent,
    NotObject,
    Is(T),
}

/// An object whose known fields are read by name; the rest is skipped.
pub(crate) trait Fields: Default {
    const NAMES: &'static [&'static str];
    /// Reads the value of field `NAMES[i]` from `map`.
    fn set<'de, A: MapAccess<'de>>(&mut self, i: usize, map: &mut A) -> Result<(), A::Error>;
}

/// A map key, as its index in a list of names (`None`: not one of them).
struct Key(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for Key {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, v: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|n| *n == v))
    }
}

fn read_fields<'de, T: Fields, A: MapAccess<'de>>(mut map: A) -> Result<T, A::Error> {
    let mut t = T::default();
    while let Some(i) = map.next_key_seed(Key(T::NAMES))? {
        match i {
            Some(i) => t.set(i, &mut map)?,
            None => {
                map.next_value::<IgnoredAny>()?;
            }
        }
    }
    Ok(t)
}

impl<'de, T: Fields> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Fields> Visitor<'de> for V<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
                read_fields(map).map(Obj::Is)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Obj<T>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Obj::NotObject)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Obj<T>, E> {
                Ok(Obj::NotObject)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Obj<T>, E> {
                Ok(Obj::NotObject)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Obj<T>, E> {
                Ok(Obj::NotObject)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Obj<T>, E> {
                Ok(Obj::NotObject)
            }
            fn visit_str<E>(self, _: &str) -> Result<Obj<T>, E> {
                Ok(Obj::NotObject)
            }
            fn visit_unit<E>(self) -> Result<Obj<T>, E> {
                Ok(Obj::NotObject)
            }
            fn visit_none<E>(self) -> Result<Obj<T>, E> {
                Ok(Obj::NotObject)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A count: a non-negative integer, or nothing (whatever else the value is), as
/// `Value::as_u64` reads it.
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Count, E> {
                Ok(Count(Some(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(v).ok()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_none<E>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Count(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Count(None))
            }
        }
        d.deserialize_any(V)
    }
}

fn count<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<u64>, A::Error> {
    Ok(map.next_value::<Count>()?.0)
}

/// `prompt_tokens_details` / `input_tokens_details`.
#[derive(Default)]
pub(crate) struct Details {
    pub(crate) cached_tokens: Option<u64>,
}

impl Fields for Details {
    const NAMES: &'static [&'static str] = &["cached_tokens"];
    fn set<'de, A: MapAccess<'de>>(&mut self, _: usize, map: &mut A) -> Result<(), A::Error> {
        self.cached_tokens = count(map)?;
        Ok(())
    }
}

/// A usage object, in any provider's names.
#[derive(Default)]
pub(crate) struct Counts {
    pub(crate) prompt_tokens: Option<u64>,
    pub(crate) completion_tokens: Option<u64>,
    pub(crate) input_tokens: Option<u64>,
    pub(crate) cache_creation_input_tokens: Option<u64>,
    pub(crate) cache_read_input_tokens: Option<u64>,
    pub(crate) output_tokens: Option<u64>,
    pub(crate) prompt_token_count: Option<u64>,
    pub(crate) candidates_token_count: Option<u64>,
    pub(crate) thoughts_token_count: Option<u64>,
    pub(crate) total_tokens: Option<u64>,
    pub(crate) total_token_count: Option<u64>,
    pub(crate) cached_content_token_count: Option<u64>,
    pub(crate) prompt_tokens_details: Obj<Details>,
    pub(crate) input_tokens_details: Obj<Details>,
}

impl Fields for Counts {
    const NAMES: &'static [&'static str] = &[
        "prompt_tokens",
        "completion_tokens",
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "output_tokens",
        "promptTokenCount",
        "candidatesTokenCount",
        "thoughtsTokenCount",
        "total_tokens",
        "totalTokenCount",
        "cachedContentTokenCount",
        "prompt_tokens_details",
        "input_tokens_details",
    ];
    fn set<'de, A: MapAccess<'de>>(&mut self, i: usize, map: &mut A) -> Result<(), A::Error> {
        let slot = match i {
            0 => &mut self.prompt_tokens,
            1 => &mut self.completion_tokens,
            2 => &mut self.input_tokens,
            3 => &mut self.cache_creation_input_tokens,
            4 => &mut self.cache_read_input_tokens,
            5 => &mut self.output_tokens,
            6 => &mut self.prompt_token_count,
            7 => &mut self.candidates_token_count,
            8 => &mut self.thoughts_token_count,
            9 => &mut self.total_tokens,
            10 => &mut self.total_token_count,
            11 => &mut self.cached_content_token_count,
            12 => {
                self.prompt_tokens_details = map.next_value()?;
                return Ok(());
            }
            _ => {
                self.input_tokens_details = map.next_value()?;
                return Ok(());
            }
        };
        *slot = count(map)?;
        Ok(())
    }
}

/// `message` (Anthropic's `message_start`) or `response` (the Responses API's
/// `response.completed`): only their `usage`.
#[derive(Default)]
pub(crate) struct Nested {
    pub(crate) usage: Obj<Counts>,
}

impl Fields for Nested {
    const NAMES: &'static [&'static str] = &["usage"];
    fn set<'de, A: MapAccess<'de>>(&mut self, _: usize, map: &mut A) -> Result<(), A::Error> {
        self.usage = map.next_value()?;
        Ok(())
    }
}

/// An answer or an event: the four places a provider puts usage.
#[derive(Default)]
pub(crate) struct Event {
    pub(crate) usage: Obj<Counts>,
    pub(crate) usage_metadata: Obj<Counts>,
    pub(crate) message: Obj<Nested>,
    pub(crate) response: Obj<Nested>,
}

impl Fields for Event {
    const NAMES: &'static [&'static str] = &["usage", "usageMetadata", "message", "response"];
    fn set<'de, A: MapAccess<'de>>(&mut self, i: usize, map: &mut A) -> Result<(), A::Error> {
        match i {
            0 => self.usage = map.next_value()?,
            1 => self.usage_metadata = map.next_value()?,
            2 => self.message = map.next_value()?,
            _ => self.response = map.next_value()?,
        }
        Ok(())
    }
}

impl Event {
    /// The usage object that counts, in the order providers are looked for: OpenAI and
    /// Anthropic `usage` (when an object), Gemini `usageMetadata`, then `message.usage`
    /// and `response.usage`. A place present but not an object ends the search with
    /// nothing, as a `Value`'s `get` chain does.
    pub(crate) fn counts(&self) -> Option<&Counts> {
        fn nested(n: &Obj<Nested>) -> Option<&Obj<Counts>> {
            match n {
                Obj::Is(n) if !matches!(n.usage, Obj::Absent) => Some(&n.usage),
                _ => None,
            }
        }
        let found = match (&self.usage, &self.usage_metadata) {
            (Obj::Is(_), _) => &self.usage,
            (_, Obj::Is(_) | Obj::NotObject) => &self.usage_metadata,
            _ => nested(&self.message).or_else(|| nested(&self.response))?,
        };
        match found {
            Obj::Is(c) => Some(c),
            _ => None,
        }
    }
}
