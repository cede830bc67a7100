//! Sequences whose count is checked before anything is decoded for them (see
//! docs/security.md, "Decoders cannot over-allocate"). A peer's message is decoded from a buffer that is already
//! bounded, but each element can cost the decoder far more heap than it takes on the wire (a
//! one-byte path becomes a 24-byte `Vec` header and an allocation): a message of tens of millions
//! of tiny elements would cost gigabytes before a check after decoding could refuse it. These
//! helpers, used as `#[serde(deserialize_with = ...)]` on every sequence a peer sends, refuse a
//! count over the bound from the sequence's length prefix, before the first element, and never
//! reserve more than a small amount up front whatever the prefix says.

use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};
use std::fmt;
use std::marker::PhantomData;

/// At most this many bytes are reserved up front for a sequence; beyond, the vector grows as
/// elements really arrive.
const PREALLOC_BYTES: usize = 64 * 1024;

struct BoundedVec<T, const MAX: usize>(PhantomData<T>);

impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for BoundedVec<T, MAX> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a sequence of at most {MAX} elements")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let declared = seq.size_hint().unwrap_or(0);
        if declared > MAX {
            return Err(A::Error::invalid_length(declared, &self));
        }
        let room = PREALLOC_BYTES / std::mem::size_of::<T>().max(1);
        let mut out = Vec::with_capacity(declared.min(room));
        while let Some(element) = seq.next_element()? {
            if out.len() == MAX {
                return Err(A::Error::invalid_length(MAX + 1, &self));
            }
            out.push(element);
        }
        Ok(out)
    }
}

/// A `Vec<T>` of at most `MAX` elements.
pub fn vec<'de, D, T, const MAX: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    d.deserialize_seq(BoundedVec::<T, MAX>(PhantomData))
}

/// A `Vec<T>` of at most `MAX` elements, as a `Deserialize` type: for a sequence inside another
/// type (`Result<Vec<T>, E>`, `Option<Vec<T>>`).
#[derive(Debug)]
pub struct Bounded<T, const MAX: usize>(pub Vec<T>);

impl<'de, T: Deserialize<'de>, const MAX: usize> Deserialize<'de> for Bounded<T, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        vec::<D, T, MAX>(d).map(Bounded)
    }
}

/// A `Result<Vec<T>, E>` whose vector has at most `MAX` elements.
pub fn result_vec<'de, D, T, E, const MAX: usize>(d: D) -> Result<Result<Vec<T>, E>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
    E: Deserialize<'de>,
{
    Ok(Result::<Bounded<T, MAX>, E>::deserialize(d)?.map(|b| b.0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Two {
        #[serde(deserialize_with = "vec::<_, _, 2>")]
        items: Vec<u8>,
        #[serde(deserialize_with = "result_vec::<_, _, _, 2>")]
        answer: Result<Vec<u16>, String>,
    }

    #[test]
    fn counts_up_to_the_bound_decode_and_over_it_are_refused_from_the_prefix() {
        let ok = Two {
            items: vec![1, 2],
            answer: Ok(vec![3, 4]),
        };
        let bytes = postcard::to_allocvec(&ok).unwrap();
        assert_eq!(postcard::from_bytes::<Two>(&bytes).unwrap(), ok);
        let err = Two {
            items: vec![],
            answer: Err("no".into()),
        };
        let bytes = postcard::to_allocvec(&err).unwrap();
        assert_eq!(postcard::from_bytes::<Two>(&bytes).unwrap(), err);
        for over in [
            Two {
                items: vec![1, 2, 3],
                answer: Ok(vec![]),
            },
            Two {
                items: vec![],
                answer: Ok(vec![1, 2, 3]),
            },
        ] {
            let bytes = postcard::to_allocvec(&over).unwrap();
            assert!(postcard::from_bytes::<Two>(&bytes).is_err(), "{over:?}");
        }
        // Three elements that do not even decode (over-long varints): refused from the
        // count, before the first of them is read.
        let bytes = [
            0x00, 0x00, 0x03, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        let e = postcard::from_bytes::<Two>(&bytes).unwrap_err();
        assert_eq!(e, postcard::Error::SerdeDeCustom);
        let bytes = [
            0x00, 0x00, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        let e = postcard::from_bytes::<Two>(&bytes).unwrap_err();
        assert_eq!(
            e,
            postcard::Error::DeserializeBadVarint,
            "within the bound: read"
        );
    }
}
