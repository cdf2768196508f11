//! Maps in request bodies whose keys must be unique: a JSON object that names
//! a key twice is refused, naming the key, instead of the last one winning.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{Deserializer, Error, MapAccess, Visitor};

use crate::quote::quote;

/// `#[serde(deserialize_with = "crate::unique::map")]` for a `BTreeMap` field.
pub fn map<'de, D, K, V>(deserializer: D) -> Result<BTreeMap<K, V>, D::Error>
where
    D: Deserializer<'de>,
    K: Deserialize<'de> + Ord + fmt::Display,
    V: Deserialize<'de>,
{
    struct Unique<K, V>(PhantomData<(K, V)>);

    impl<'de, K, V> Visitor<'de> for Unique<K, V>
    where
        K: Deserialize<'de> + Ord + fmt::Display,
        V: Deserialize<'de>,
    {
        type Value = BTreeMap<K, V>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map with unique keys")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(key) = access.next_key::<K>()? {
                if out.contains_key(&key) {
                    return Err(A::Error::custom(format!(
                        "the key {} is given twice: give each key once",
                        quote(&key.to_string())
                    )));
                }
                let value = access.next_value()?;
                out.insert(key, value);
            }
            Ok(out)
        }
    }

    deserializer.deserialize_map(Unique(PhantomData))
}

/// [`map`] for an `Option<BTreeMap>` field (with `#[serde(default)]`): null is `None`.
pub fn optional_map<'de, D, K, V>(deserializer: D) -> Result<Option<BTreeMap<K, V>>, D::Error>
where
    D: Deserializer<'de>,
    K: Deserialize<'de> + Ord + fmt::Display,
    V: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(bound = "K: Deserialize<'de> + Ord + fmt::Display, V: Deserialize<'de>")]
    struct Unique<K, V>(#[serde(deserialize_with = "map")] BTreeMap<K, V>);

    Ok(Option::<Unique<K, V>>::deserialize(deserializer)?.map(|u| u.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Env {
        #[serde(deserialize_with = "map")]
        env: BTreeMap<String, String>,
    }

    // A key given twice is refused by name; distinct keys all arrive.
    #[test]
    fn duplicate_keys_are_refused() {
        let err = serde_json::from_str::<Env>(r#"{"env": {"A": "1", "B": "2", "A": "3"}}"#).unwrap_err();
        assert!(err.to_string().contains("the key \"A\" is given twice"), "{err}");
        let ok: Env = serde_json::from_str(r#"{"env": {"A": "1", "B": "2"}}"#).unwrap();
        assert_eq!(ok.env.len(), 2);
    }
}
