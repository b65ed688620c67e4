//! The signed message the hub sends one device on `tessera/v1/{device}/control`.
//!
//! `{0: 30, 1: device, 2: command, 3: issued_at}`, signed by the hub. A device acts only
//! on a control message for its own id, issued after it enrolled, so a recorded message
//! cannot be replayed against it once it has enrolled again.

use super::{MessageType, read_id, read_type};
use crate::cbor::{Reader, SeenKeys};
use crate::cose::{self, Sign1};
use crate::crypto::{KeyLookup, Signer};
use crate::error::{DecodeError, Error};

/// What the hub tells a device to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Command {
    /// The device is revoked: wipe stored tokens and grants and stop refreshing.
    Revoked = 1,
    /// Refresh the device token now (for example after a role change).
    RefreshNow = 2,
}

impl Command {
    /// The command's number on the wire.
    pub const fn as_u64(self) -> u64 {
        self as u64
    }

    /// The command with this wire number, if any.
    pub const fn from_u64(n: u64) -> Option<Self> {
        Some(match n {
            1 => Self::Revoked,
            2 => Self::RefreshNow,
            _ => return None,
        })
    }
}

/// A control message for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control<'a> {
    /// The device it is for.
    pub device: &'a str,
    /// What to do.
    pub command: Command,
    /// The hub's time when sending, Unix seconds.
    pub issued_at: u64,
}

impl<'a> Control<'a> {
    /// Writes the payload map into `out`; returns its length.
    pub fn encode_to(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = crate::cbor::writer(out);
        w.map(4)?
            .u8(0)?
            .u64(MessageType::Control.as_u64())?
            .u8(1)?
            .str(self.device)?
            .u8(2)?
            .u64(self.command as u64)?
            .u8(3)?
            .u64(self.issued_at)?;
        Ok(crate::cbor::written(&w))
    }

    /// Decodes a payload map strictly.
    pub fn decode(payload: &'a [u8]) -> Result<Self, Error> {
        let mut r = Reader::new(payload);
        let n = read_type(&mut r, MessageType::Control, 3)?;
        let mut seen = SeenKeys::default();
        let (mut device, mut command, mut issued_at) = (None, None, None);
        for _ in 0..n {
            let k = r.key()?;
            seen.insert(k)?;
            match k {
                1 => device = Some(read_id(&mut r)?),
                2 => {
                    command = Some(
                        Command::from_u64(r.uint()?).ok_or(DecodeError::InvalidValue("command"))?,
                    )
                }
                3 => issued_at = Some(r.uint()?),
                _ => return Err(DecodeError::InvalidValue("control key").into()),
            }
        }
        r.finish()?;
        Ok(Self {
            device: device.ok_or(DecodeError::MissingField("device"))?,
            command: command.ok_or(DecodeError::MissingField("command"))?,
            issued_at: issued_at.ok_or(DecodeError::MissingField("issued_at"))?,
        })
    }

    /// Signs the message with the hub's key into `out`; returns the length.
    pub fn sign(&self, signer: &dyn Signer, out: &mut [u8]) -> Result<usize, Error> {
        cose::sign_with(signer, out, |buf| self.encode_to(buf))
    }

    /// Decodes a signed control message and checks the hub's signature.
    pub fn verify(bytes: &'a [u8], keys: &dyn KeyLookup) -> Result<Self, Error> {
        Self::decode(Sign1::decode(bytes)?.verify(keys)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::testing::signer;

    #[test]
    fn control_round_trips_and_needs_the_hub_signature() {
        let c = Control {
            device: "device-42",
            command: Command::Revoked,
            issued_at: 1_700_000_000,
        };
        let mut out = [0u8; 256];
        let n = c.sign(&signer(1), &mut out).expect("sign");
        assert_eq!(Control::verify(&out[..n], &signer(1).public_key()), Ok(c));
        assert!(Control::verify(&out[..n], &signer(2).public_key()).is_err());
    }
}
