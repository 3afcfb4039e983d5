//! Encoding with a size bound: the one place that turns values into
//! postcard bytes for a datagram and back.
//!
//! Three things are encoded for the wire, each with its own bound: protocol
//! messages ([`encode`], [`MAX_MESSAGE`]), user messages inside `Data`
//! ([`encode_user`], [`MAX_MESSAGE_SIZE`]) and the data attached to a client
//! socket handoff (`pipe.rs`). All go through [`encode_limited`].

use serde::{de::DeserializeOwned, Serialize};

use super::message::MAX_MESSAGE;
use crate::error::{Error, Kind, Result};

/// Largest user message, encoded, that `MessageChannel::send` and the
/// watcher's `send`/`broadcast` accept: what fits in one `Data` message.
pub const MAX_MESSAGE_SIZE: usize = MAX_MESSAGE - 16;

/// Why a value could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EncodeError {
    Serialize(String),
    TooLarge { len: usize, limit: usize },
}

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncodeError::Serialize(e) => write!(f, "cannot encode message: {e}"),
            EncodeError::TooLarge { len, limit } => {
                write!(
                    f,
                    "message of {len} bytes exceeds the limit of {limit} bytes"
                )
            }
        }
    }
}

/// Why a datagram could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// Not a valid encoding of the message type.
    Malformed(String),
    /// A valid message followed by extra bytes.
    TrailingBytes(usize),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Malformed(e) => write!(f, "malformed message: {e}"),
            DecodeError::TrailingBytes(n) => write!(f, "malformed message: {n} trailing bytes"),
        }
    }
}

/// Encodes `value` with postcard, refusing an encoding longer than `limit`.
pub(crate) fn encode_limited<T: Serialize + ?Sized>(
    value: &T,
    limit: usize,
) -> std::result::Result<Vec<u8>, EncodeError> {
    let bytes = postcard::to_stdvec(value).map_err(|e| EncodeError::Serialize(e.to_string()))?;
    if bytes.len() > limit {
        return Err(EncodeError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    Ok(bytes)
}

/// Encodes a protocol message, refusing anything over [`MAX_MESSAGE`].
pub(crate) fn encode<T: Serialize>(msg: &T) -> std::result::Result<Vec<u8>, EncodeError> {
    encode_limited(msg, MAX_MESSAGE)
}

/// Decodes one whole datagram. Never panics, whatever the bytes.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> std::result::Result<T, DecodeError> {
    let (msg, rest) =
        postcard::take_from_bytes::<T>(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Turns an [`EncodeError`] into the crate's error: too large is
/// [`Error::is_too_large`], anything else [`Error::is_ipc`].
pub(crate) fn encode_error(what: &str, e: EncodeError) -> Error {
    match e {
        EncodeError::TooLarge { len, limit } => Error::new(
            Kind::TooLarge,
            format!("{what} of {len} bytes exceeds the limit of {limit} bytes"),
        ),
        EncodeError::Serialize(e) => {
            Error::new(Kind::Ipc, format!("cannot encode the {what}: {e}"))
        }
    }
}

/// Encodes a user message (what `Data` carries).
pub(crate) fn encode_user<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    encode_limited(msg, MAX_MESSAGE_SIZE).map_err(|e| encode_error("message", e))
}

/// Decodes a user message.
pub(crate) fn decode_user<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    decode(bytes).map_err(|e| Error::new(Kind::Ipc, format!("cannot decode the message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_checked_and_typed() {
        assert_eq!(encode_limited(&[1u8, 2, 3][..], 4).unwrap(), [3, 1, 2, 3]);
        assert_eq!(
            encode_limited(&[1u8, 2, 3][..], 3),
            Err(EncodeError::TooLarge { len: 4, limit: 3 })
        );
        let big = vec![0u8; MAX_MESSAGE_SIZE];
        assert!(encode_user(&big).unwrap_err().is_too_large());
        let bytes = encode_user(&("hi", 7u32)).unwrap();
        assert_eq!(
            decode_user::<(String, u32)>(&bytes).unwrap(),
            ("hi".into(), 7)
        );
        assert!(decode_user::<String>(&[0xff, 0xff]).unwrap_err().is_ipc());
    }
}
