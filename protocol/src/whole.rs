//! Whole numbers in request bodies, read as JSON Schema counts them: `7` and
//! `7.0` are both the integer 7 (a JSON Schema validator, and so any client
//! the OpenAPI document generates, may send either). `7.5` is refused.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserializer, Error, Visitor};

/// `#[serde(default, deserialize_with = "crate::whole::optional")]` for an
/// `Option` of an unsigned integer field.
pub fn optional<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct Whole<T>(PhantomData<T>);

    impl<'de, T: TryFrom<u64>> Visitor<'de> for Whole<T> {
        type Value = Option<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a whole number of at least 0")
        }
        fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
        fn visit_u64<E: Error>(self, n: u64) -> Result<Self::Value, E> {
            T::try_from(n).map(Some).map_err(|_| E::custom(format!("{n} is out of range")))
        }
        fn visit_i64<E: Error>(self, n: i64) -> Result<Self::Value, E> {
            match u64::try_from(n) {
                Ok(n) => self.visit_u64(n),
                Err(_) => Err(E::custom(format!("{n} is not a whole number of at least 0"))),
            }
        }
        fn visit_f64<E: Error>(self, f: f64) -> Result<Self::Value, E> {
            if f.fract() != 0.0 || f < 0.0 {
                return Err(E::custom(format!("{f} is not a whole number of at least 0")));
            }
            if f >= u64::MAX as f64 {
                return Err(E::custom(format!("{f} is out of range")));
            }
            self.visit_u64(f as u64)
        }
    }

    deserializer.deserialize_option(Whole(PhantomData))
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize, Debug)]
    struct R {
        #[serde(default, deserialize_with = "super::optional")]
        n: Option<u32>,
    }

    fn parse(json: &str) -> Result<Option<u32>, String> {
        serde_json::from_str::<R>(json).map(|r| r.n).map_err(|e| e.to_string())
    }

    // 7 and 7.0 are the same integer; fractions, negatives and overflow are refused.
    #[test]
    fn whole_numbers_in_either_spelling() {
        assert_eq!(parse(r#"{"n":7}"#), Ok(Some(7)));
        assert_eq!(parse(r#"{"n":7.0}"#), Ok(Some(7)));
        assert_eq!(parse(r#"{}"#), Ok(None));
        assert_eq!(parse(r#"{"n":null}"#), Ok(None));
        assert!(parse(r#"{"n":7.5}"#).unwrap_err().contains("not a whole number"));
        assert!(parse(r#"{"n":-1}"#).unwrap_err().contains("not a whole number"));
        assert!(parse(r#"{"n":4294967296}"#).unwrap_err().contains("out of range"));
    }
}
