//! The server socket pipe's wire format (private; both ends must be built
//! from the same version of this crate).
//!
//! One request per datagram, one reply per request, in order:
//!
//! ```text
//! factory → provider   [VERSION] postcard(Request { id, addr })           no descriptor
//! provider → factory   [VERSION] postcard(Reply { id, result: Ok(()) })   + the listening socket
//!                      [VERSION] postcard(Reply { id, result: Err(Refusal { kind, context, errno, source }) })
//! ```
//!
//! A refusal carries the provider's error as it was made (kind, context,
//! OS error number or source text), so the factory's `Err` reads and
//! matches exactly like the provider's.

use std::io;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Kind};

/// The protocol version, the first byte of every datagram.
pub(super) const VERSION: u8 = 1;

/// The longest address a request may carry, in bytes.
pub(super) const MAX_ADDR_LEN: usize = 4096;

/// The largest request datagram: an address of [`MAX_ADDR_LEN`] bytes with
/// its id, varints and version byte.
pub(super) const MAX_REQUEST: usize = MAX_ADDR_LEN + 32;

/// The longest text a refusal carries (context and source each); longer
/// ones are cut at a character boundary.
const MAX_TEXT: usize = 8192;

/// A factory's request: a listening socket for `addr`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Request {
    pub id: u64,
    pub addr: String,
}

/// The provider's answer to request `id`; on `Ok` the socket is attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Reply {
    pub id: u64,
    pub result: Result<(), Refusal>,
}

/// Why the provider refused: its error, in parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Refusal {
    /// The error's kind ([`kind_code`]).
    pub kind: u8,
    pub context: String,
    /// The OS error number, when the source is an OS error.
    pub errno: Option<i32>,
    /// The source's text, when there is a source that is not an OS error.
    pub source: Option<String>,
}

/// Error kinds on the wire; an unknown code reads as [`Kind::Bind`].
fn kind_code(kind: Kind) -> u8 {
    match kind {
        Kind::InvalidAddress => 1,
        Kind::Bind => 2,
        Kind::Ipc => 4,
        Kind::TooLarge => 5,
        _ => 3,
    }
}

fn code_kind(code: u8) -> Kind {
    match code {
        1 => Kind::InvalidAddress,
        3 => Kind::Io,
        4 => Kind::Ipc,
        5 => Kind::TooLarge,
        _ => Kind::Bind,
    }
}

fn cut(mut text: String) -> String {
    if text.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

impl Refusal {
    /// The provider's error, for the wire.
    pub(super) fn from_error(e: &Error) -> Refusal {
        let errno = e.io_error().and_then(io::Error::raw_os_error);
        let source = match errno {
            Some(_) => None,
            None => std::error::Error::source(e).map(|s| cut(s.to_string())),
        };
        Refusal {
            kind: kind_code(e.kind()),
            context: cut(e.context().to_string()),
            errno,
            source,
        }
    }

    /// The error as the provider made it.
    pub(super) fn into_error(self) -> Error {
        let kind = code_kind(self.kind);
        match (self.errno, self.source) {
            (Some(errno), _) => {
                Error::with_io(kind, self.context, io::Error::from_raw_os_error(errno))
            }
            (None, Some(source)) => Error::new(kind, format!("{}: {source}", self.context)),
            (None, None) => Error::new(kind, self.context),
        }
    }
}

fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let bytes = vec![VERSION];
    // A Vec writer cannot fail, and every field here serializes.
    match postcard::to_extend(msg, bytes) {
        Ok(bytes) => bytes,
        Err(_) => vec![VERSION],
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (&version, body) = bytes.split_first().ok_or("an empty datagram")?;
    if version != VERSION {
        return Err(format!(
            "protocol version {version} (this end speaks {VERSION})"
        ));
    }
    let (msg, rest) = postcard::take_from_bytes::<T>(body).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes", rest.len()));
    }
    Ok(msg)
}

pub(super) fn encode_request(request: &Request) -> Vec<u8> {
    encode(request)
}

/// Decodes a request datagram. Never panics, whatever the bytes.
pub(super) fn decode_request(bytes: &[u8]) -> Result<Request, String> {
    if bytes.len() > MAX_REQUEST {
        return Err(format!(
            "a request of {} bytes (at most {MAX_REQUEST})",
            bytes.len()
        ));
    }
    decode(bytes)
}

pub(super) fn encode_reply(reply: &Reply) -> Vec<u8> {
    encode(reply)
}

/// Decodes a reply datagram. Never panics, whatever the bytes.
pub(super) fn decode_reply(bytes: &[u8]) -> Result<Reply, String> {
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_is_stable() {
        let bytes = encode_request(&Request {
            id: 1,
            addr: "h:1".into(),
        });
        // version, id varint, address length, address bytes.
        assert_eq!(bytes, [VERSION, 1, 3, b'h', b':', b'1']);
        assert_eq!(decode_request(&bytes).unwrap().addr, "h:1");
    }

    #[test]
    fn replies_round_trip() {
        for result in [
            Ok(()),
            Err(Refusal {
                kind: 2,
                context: "cannot listen on 127.0.0.1:1".into(),
                errno: Some(libc::EADDRINUSE),
                source: None,
            }),
        ] {
            let reply = Reply { id: 7, result };
            assert_eq!(decode_reply(&encode_reply(&reply)).unwrap(), reply);
        }
    }

    #[test]
    fn a_refusal_rebuilds_the_error() {
        let io = io::Error::from_raw_os_error(libc::EADDRINUSE);
        let e = Error::with_io(Kind::Bind, "cannot listen on 127.0.0.1:1", io);
        let back = Refusal::from_error(&e).into_error();
        assert!(back.is_bind());
        assert_eq!(back.to_string(), e.to_string());
        assert_eq!(
            back.io_error().and_then(io::Error::raw_os_error),
            Some(libc::EADDRINUSE)
        );
        let custom = Error::with_io(
            Kind::Bind,
            "cannot listen on unix:///x",
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "path exists and is not a socket",
            ),
        );
        let back = Refusal::from_error(&custom).into_error();
        assert!(back.is_bind());
        assert_eq!(back.to_string(), custom.to_string());
        let invalid = Error::new(Kind::InvalidAddress, "invalid address \"x\"");
        let back = Refusal::from_error(&invalid).into_error();
        assert!(back.is_invalid_address());
        assert_eq!(back.to_string(), invalid.to_string());
        // An unknown kind from a newer peer still reads as a bind error.
        let unknown = Refusal {
            kind: 200,
            context: "c".into(),
            errno: None,
            source: None,
        };
        assert!(unknown.into_error().is_bind());
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let good = encode_request(&Request {
            id: 3,
            addr: "127.0.0.1:80".into(),
        });
        let mut wrong_version = good.clone();
        wrong_version[0] = VERSION + 1;
        let mut trailing = good.clone();
        trailing.push(0);
        let too_long = [VERSION]
            .into_iter()
            .chain(std::iter::repeat_n(b'a', MAX_REQUEST))
            .collect::<Vec<u8>>();
        for bad in [
            &[][..],
            &[VERSION][..],
            &[VERSION, 1, 200][..],
            &[
                VERSION, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ][..],
            &[VERSION, 1, 2, 0xff, 0xfe][..], // not UTF-8
            &wrong_version,
            &trailing,
            &too_long,
        ] {
            assert!(decode_request(bad).is_err(), "{bad:?}");
            let _ = decode_reply(bad);
        }
        // Every prefix of a valid datagram is refused, none panics.
        for n in 0..good.len() {
            assert!(decode_request(&good[..n]).is_err());
        }
    }

    #[test]
    fn long_texts_are_cut() {
        let e = Error::new(Kind::Bind, "é".repeat(MAX_TEXT));
        let r = Refusal::from_error(&e);
        assert!(r.context.len() <= MAX_TEXT);
        assert!(r.context.chars().all(|c| c == 'é'));
    }
}
