//! Strict CBOR reading and small encoding helpers shared by every codec in the core.
//!
//! minicbor does the parsing; this module adds the rules the protocol needs on top:
//! definite lengths only, bounded sizes and depth, no duplicate map keys, no trailing bytes.

use minicbor::data::Type;
use minicbor::encode::write::{Cursor, EndOfSlice};
use minicbor::{Decoder, Encoder};

use crate::error::{DecodeError, EncodeError, Error};

/// Deepest nesting accepted when skipping unknown values.
pub(crate) const MAX_DEPTH: usize = 8;

/// Most entries accepted in any map the core decodes.
pub(crate) const MAX_MAP_ENTRIES: usize = 32;

/// A strict decoder over one buffer.
#[derive(Debug)]
pub(crate) struct Reader<'b> {
    d: Decoder<'b>,
}

impl<'b> Reader<'b> {
    pub(crate) fn new(bytes: &'b [u8]) -> Self {
        Self {
            d: Decoder::new(bytes),
        }
    }

    pub(crate) fn position(&self) -> usize {
        self.d.position()
    }

    /// The whole input this reader walks.
    pub(crate) fn input(&self) -> &'b [u8] {
        self.d.input()
    }

    /// A new reader over the same input, positioned at `pos`.
    pub(crate) fn at(&self, pos: usize) -> Reader<'b> {
        let mut d = Decoder::new(self.d.input());
        d.set_position(pos);
        Reader { d }
    }

    pub(crate) fn datatype(&self) -> Result<Type, DecodeError> {
        Ok(self.d.datatype()?)
    }

    /// Reads a definite-length map header, at most `max` entries.
    pub(crate) fn map(&mut self, max: usize) -> Result<usize, DecodeError> {
        match self.datatype()? {
            Type::Map => {}
            Type::MapIndef => return Err(DecodeError::IndefiniteLength),
            _ => return Err(DecodeError::UnexpectedType),
        }
        let n = self.d.map()?.ok_or(DecodeError::IndefiniteLength)?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= max)
            .ok_or(DecodeError::TooLarge)
    }

    /// Reads a definite-length array header, at most `max` items.
    pub(crate) fn array(&mut self, max: usize) -> Result<usize, DecodeError> {
        match self.datatype()? {
            Type::Array => {}
            Type::ArrayIndef => return Err(DecodeError::IndefiniteLength),
            _ => return Err(DecodeError::UnexpectedType),
        }
        let n = self.d.array()?.ok_or(DecodeError::IndefiniteLength)?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= max)
            .ok_or(DecodeError::TooLarge)
    }

    /// Reads an array header that must have exactly `n` items.
    pub(crate) fn array_exact(&mut self, n: usize) -> Result<(), DecodeError> {
        if self.array(n)? != n {
            return Err(DecodeError::InvalidValue("array length"));
        }
        Ok(())
    }

    /// Reads a map key, which the protocol always makes an integer.
    pub(crate) fn key(&mut self) -> Result<i64, DecodeError> {
        self.int()
    }

    pub(crate) fn int(&mut self) -> Result<i64, DecodeError> {
        match self.datatype()? {
            Type::U8 | Type::U16 | Type::U32 | Type::U64 => {}
            Type::I8 | Type::I16 | Type::I32 | Type::I64 => {}
            Type::Int => return Err(DecodeError::InvalidValue("integer out of range")),
            _ => return Err(DecodeError::UnexpectedType),
        }
        Ok(self.d.i64()?)
    }

    pub(crate) fn uint(&mut self) -> Result<u64, DecodeError> {
        match self.datatype()? {
            Type::U8 | Type::U16 | Type::U32 | Type::U64 => Ok(self.d.u64()?),
            _ => Err(DecodeError::UnexpectedType),
        }
    }

    /// Reads a definite-length byte string of at most `max` bytes.
    pub(crate) fn bytes(&mut self, max: usize) -> Result<&'b [u8], DecodeError> {
        match self.datatype()? {
            Type::Bytes => {}
            Type::BytesIndef => return Err(DecodeError::IndefiniteLength),
            _ => return Err(DecodeError::UnexpectedType),
        }
        let b = self.d.bytes()?;
        if b.len() > max {
            return Err(DecodeError::TooLarge);
        }
        Ok(b)
    }

    /// Reads a byte string that must be exactly `N` bytes long.
    pub(crate) fn bytes_exact<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(N)?;
        b.try_into().map_err(|_| DecodeError::InvalidValue(field))
    }

    /// Reads a definite-length UTF-8 text string of at most `max` bytes.
    pub(crate) fn str(&mut self, max: usize) -> Result<&'b str, DecodeError> {
        match self.datatype()? {
            Type::String => {}
            Type::StringIndef => return Err(DecodeError::IndefiniteLength),
            _ => return Err(DecodeError::UnexpectedType),
        }
        let s = self.d.str()?;
        if s.len() > max {
            return Err(DecodeError::TooLarge);
        }
        Ok(s)
    }

    /// Reads an optional tag; returns it if one is present.
    pub(crate) fn tag(&mut self) -> Result<Option<u64>, DecodeError> {
        if self.datatype()? == Type::Tag {
            Ok(Some(self.d.tag()?.as_u64()))
        } else {
            Ok(None)
        }
    }

    /// Skips one data item of any type, refusing indefinite lengths and deep nesting.
    pub(crate) fn skip(&mut self) -> Result<(), DecodeError> {
        self.skip_at(0)
    }

    fn skip_at(&mut self, depth: usize) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        match self.datatype()? {
            Type::Array => {
                let n = self.array(usize::MAX)?;
                for _ in 0..n {
                    self.skip_at(depth + 1)?;
                }
            }
            Type::Map => {
                let n = self.map(usize::MAX)?;
                for _ in 0..n {
                    self.skip_at(depth + 1)?;
                    self.skip_at(depth + 1)?;
                }
            }
            Type::Tag => {
                self.d.tag()?;
                self.skip_at(depth + 1)?;
            }
            Type::ArrayIndef
            | Type::MapIndef
            | Type::BytesIndef
            | Type::StringIndef
            | Type::Break => return Err(DecodeError::IndefiniteLength),
            Type::Unknown(_) => return Err(DecodeError::Malformed),
            _ => self.d.skip()?,
        }
        Ok(())
    }

    /// Succeeds only if every input byte has been consumed.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.d.position() == self.d.input().len() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}

/// Remembers which integer keys of one map were seen, to refuse duplicates.
#[derive(Debug, Default)]
pub(crate) struct SeenKeys {
    keys: heapless::Vec<i64, MAX_MAP_ENTRIES>,
}

impl SeenKeys {
    pub(crate) fn insert(&mut self, key: i64) -> Result<(), DecodeError> {
        if self.keys.contains(&key) {
            return Err(DecodeError::DuplicateKey(key));
        }
        self.keys.push(key).map_err(|_| DecodeError::TooLarge)
    }

    pub(crate) fn contains(&self, key: i64) -> bool {
        self.keys.contains(&key)
    }
}

/// An encoder over a caller's buffer.
pub(crate) type Writer<'a> = Encoder<Cursor<&'a mut [u8]>>;

pub(crate) fn writer(out: &mut [u8]) -> Writer<'_> {
    Encoder::new(Cursor::new(out))
}

/// Bytes written so far by a [`Writer`].
pub(crate) fn written(w: &Writer<'_>) -> usize {
    w.writer().position()
}

impl From<minicbor::encode::Error<EndOfSlice>> for EncodeError {
    fn from(_: minicbor::encode::Error<EndOfSlice>) -> Self {
        EncodeError::BufferTooSmall
    }
}

impl From<minicbor::encode::Error<EndOfSlice>> for Error {
    fn from(e: minicbor::encode::Error<EndOfSlice>) -> Self {
        Error::Encode(e.into())
    }
}

/// The CBOR head (major type and length) of an item, as at most 9 bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Head {
    buf: [u8; 9],
    len: usize,
}

impl Head {
    /// Major type 2 (byte string) of `len` bytes.
    pub(crate) fn bytes(len: usize) -> Self {
        Self::new(2, len as u64)
    }

    /// Encodes a head of `major` type with argument `arg` in its shortest form.
    pub(crate) fn new(major: u8, arg: u64) -> Self {
        let be = arg.to_be_bytes();
        let mut buf = [0u8; 9];
        // Additional info 0..=23 holds the value itself; 24..=27 say 1, 2, 4 or 8 bytes follow.
        let (info, follow) = match arg {
            0..=23 => (be[7], 0),
            24..=0xff => (24, 1),
            0x100..=0xffff => (25, 2),
            0x1_0000..=0xffff_ffff => (26, 4),
            _ => (27, 8),
        };
        buf[0] = (major << 5) | info;
        buf[1..=follow].copy_from_slice(&be[8 - follow..]);
        Self {
            buf,
            len: 1 + follow,
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_matches_minicbor_for_every_length_class() {
        for len in [0usize, 23, 24, 255, 256, 65535, 65536] {
            let mut expect = [0u8; 16];
            let mut e = writer(&mut expect);
            e.array(len as u64).ok();
            let n = written(&e);
            let head = Head::new(4, len as u64);
            assert_eq!(head.as_slice(), &expect[..n], "len {len}");
        }
    }

    #[test]
    fn skip_refuses_indefinite_and_deep_items() {
        // [_ 1] indefinite array
        let mut r = Reader::new(&[0x9f, 0x01, 0xff]);
        assert_eq!(r.skip(), Err(DecodeError::IndefiniteLength));
        // 10 nested arrays
        let deep = [0x81u8; 10];
        let mut r = Reader::new(&deep);
        assert_eq!(r.skip(), Err(DecodeError::TooDeep));
    }

    #[test]
    fn seen_keys_refuses_duplicates() {
        let mut s = SeenKeys::default();
        s.insert(1).unwrap_or_default();
        assert_eq!(s.insert(1), Err(DecodeError::DuplicateKey(1)));
    }

    #[test]
    fn finish_refuses_trailing_bytes() {
        let mut r = Reader::new(&[0x01, 0x02]);
        assert_eq!(r.uint(), Ok(1));
        assert_eq!(r.finish(), Err(DecodeError::TrailingBytes));
    }
}
