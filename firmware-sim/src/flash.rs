//! A simulated device's flash: the persisted state sealed in the shared record format
//! ([`tessera_shared::record`]) into one of two slots, and a monotonic counter for rollback
//! detection, with writes that power loss can cut short the way a NOR flash write fails.
//!
//! # Layout and write order
//!
//! Two slots of [`SLOT_LEN`] bytes, each a 2-byte big-endian length and one sealed record,
//! the rest erased (`0xFF`). A write seals the state with the next counter and puts it in
//! the slot that does *not* hold the newest readable record: erase the slot, program it
//! page by page ([`PAGE_LEN`]), then write the counter (one word: atomic). So a cut
//! anywhere leaves the previous record intact:
//!
//! - during the erase: the slot is partly erased; every byte is `0xFF` or its old value
//!   with some bits already raised (erasing drives bits from 0 to 1);
//! - during programming: pages before the cut hold the new bytes, the page being programmed
//!   holds them with some bits still at 1 (programming drives bits from 1 to 0), later
//!   pages are still erased;
//! - between the record and the counter: the new record is whole but the counter lags it,
//!   which opens fine (its counter is higher than the one remembered).
//!
//! # Reading at power-on
//!
//! Both slots are tried newest first (by their unauthenticated counter, only to choose the
//! order), each opened with [`record::open`] against the counter: the first that
//! authenticates and is not older than the counter is the state the machine boots from. A
//! torn slot fails authentication (or is not a record at all) and is skipped. If none
//! opens, the machine boots with nothing stored and enrolls again; when the counter says
//! records were written, that is a lost store, counted apart ([`Read::Lost`]).

use tessera_shared::record::{self, RecordKey};

use crate::Error;

/// Bytes one page program writes.
pub const PAGE_LEN: usize = 256;

/// One slot: the length prefix and the largest sealed record, in whole pages.
pub const SLOT_LEN: usize = (2 + record::MAX_RECORD_LEN).div_ceil(PAGE_LEN) * PAGE_LEN;

/// A small, fast generator for the simulation's own choices (where power fails, which bits
/// a cut leaves half-written); not for anything secret.
#[derive(Debug, Clone)]
pub struct Dice(u64);

impl Dice {
    /// Seeded from `seed` (any value; zero is replaced).
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// The next 64 random bits (xorshift64*).
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `p` (0 to 1).
    pub fn chance(&mut self, p: f64) -> bool {
        // 53 bits of the draw as a fraction in [0, 1).
        #[allow(clippy::cast_precision_loss)]
        let x = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        x < p
    }

    fn byte(&mut self) -> u8 {
        self.next_u64().to_be_bytes()[0]
    }
}

/// What a power-on read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// Nothing was ever written (or the store was wiped): boot with nothing stored.
    Empty,
    /// The newest readable record's plaintext.
    State(Vec<u8>),
    /// Records were written (the counter says so) but none opens.
    Lost,
}

/// The power failed during a write; the device is off until it boots again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerCut;

/// Where a cut write stopped.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// During the erase, this far through it (0 to 1).
    Erase(f64),
    /// While programming page `n`.
    Program(usize),
    /// After the record, before the counter.
    BeforeCounter,
}

/// One device's flash.
pub struct Flash {
    key: RecordKey,
    device_id: String,
    slots: [Vec<u8>; 2],
    /// The monotonic counter: the highest record counter written.
    counter: u64,
    /// The slot holding the newest readable record, as far as this power cycle knows.
    newest: Option<usize>,
    /// Whether the state was wiped (revocation): nothing to read, counter kept.
    wiped: bool,
    /// The share of writes power fails during.
    cut_rate: f64,
    dice: Dice,
    /// Records written whole.
    pub writes: u64,
    /// Writes cut short.
    pub cuts: u64,
}

impl std::fmt::Debug for Flash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The slots hold sealed tokens: show where things stand, not the bytes.
        f.debug_struct("Flash")
            .field("device_id", &self.device_id)
            .field("counter", &self.counter)
            .field("newest", &self.newest)
            .field("writes", &self.writes)
            .field("cuts", &self.cuts)
            .finish_non_exhaustive()
    }
}

impl Flash {
    /// An erased flash for `device_id`, its records sealed under a key derived from
    /// `device_secret`; power fails during a share `cut_rate` of the writes.
    pub fn new(
        device_secret: &[u8; 32],
        device_id: &str,
        cut_rate: f64,
        seed: u64,
    ) -> Result<Self, Error> {
        Ok(Self {
            key: RecordKey::derive(device_secret, device_id).map_err(Error::Core)?,
            device_id: device_id.to_string(),
            slots: [vec![0xFF; SLOT_LEN], vec![0xFF; SLOT_LEN]],
            counter: 0,
            newest: None,
            wiped: false,
            cut_rate,
            dice: Dice::new(seed),
            writes: 0,
            cuts: 0,
        })
    }

    /// Reads at power-on: see the module docs.
    pub fn read(&mut self) -> Read {
        self.newest = None;
        if self.wiped {
            return Read::Empty;
        }
        let mut order: Vec<(u64, usize)> = (0..2)
            .filter_map(|i| {
                let rec = record_in(&self.slots[i])?;
                record::peek_counter(rec).ok().map(|c| (c, i))
            })
            .collect();
        order.sort_unstable_by(|a, b| b.cmp(a));
        for (_, i) in order {
            let Some(rec) = record_in(&self.slots[i]) else {
                continue;
            };
            let mut buf = rec.to_vec();
            if let Ok(opened) = record::open(&self.key, &self.device_id, self.counter, &mut buf) {
                // A record ahead of the counter: power failed before the counter was
                // written. It is the newest; catch the counter up.
                self.counter = self.counter.max(opened.counter);
                let plaintext = opened.plaintext.to_vec();
                self.newest = Some(i);
                return Read::State(plaintext);
            }
        }
        if self.counter == 0 {
            Read::Empty
        } else {
            Read::Lost
        }
    }

    /// Seals `plaintext` with the next counter into the other slot. Fails with
    /// [`PowerCut`] (the write torn as the module docs say) for a share of the writes.
    pub fn write(&mut self, plaintext: &[u8], nonce: [u8; 12]) -> Result<(), PowerCut> {
        let counter = self.counter + 1;
        let mut sealed = vec![0u8; record::sealed_len(plaintext.len())];
        let Some(room) = record::plaintext_mut(&mut sealed).get_mut(..plaintext.len()) else {
            // The machine's state always fits a record (a compile-time check in `shared`).
            return Ok(());
        };
        room.copy_from_slice(plaintext);
        let Ok(len) = record::seal(
            &self.key,
            &self.device_id,
            counter,
            nonce,
            &mut sealed,
            plaintext.len(),
        ) else {
            return Ok(());
        };
        let mut image = vec![0xFF; SLOT_LEN];
        let Ok(prefix) = u16::try_from(len) else {
            return Ok(());
        };
        image[..2].copy_from_slice(&prefix.to_be_bytes());
        image[2..2 + len].copy_from_slice(&sealed[..len]);
        let target = self.newest.map_or(0, |n| 1 - n);
        self.wiped = false;
        let cut = self.dice.chance(self.cut_rate).then(|| self.cut_point(len));
        let slot = &mut self.slots[target];
        match cut {
            Some(Cut::Erase(progress)) => {
                for b in slot.iter_mut() {
                    *b = if self.dice.chance(progress) {
                        0xFF
                    } else {
                        *b | (self.dice.byte() & self.dice.byte())
                    };
                }
            }
            Some(Cut::Program(page)) => {
                slot.fill(0xFF);
                let start = page * PAGE_LEN;
                slot[..start].copy_from_slice(&image[..start]);
                for (b, new) in slot[start..start + PAGE_LEN]
                    .iter_mut()
                    .zip(&image[start..start + PAGE_LEN])
                {
                    *b = new | (self.dice.byte() & self.dice.byte());
                }
            }
            Some(Cut::BeforeCounter) | None => slot.copy_from_slice(&image),
        }
        match cut {
            None => {
                self.counter = counter;
                self.newest = Some(target);
                self.writes += 1;
                Ok(())
            }
            Some(_) => {
                self.cuts += 1;
                Err(PowerCut)
            }
        }
    }

    /// Erases both slots (the device was revoked); the counter stays, so an old record
    /// put back would be a rollback.
    pub fn wipe(&mut self) {
        for slot in &mut self.slots {
            slot.fill(0xFF);
        }
        self.newest = None;
        self.wiped = true;
    }

    /// Where a write of a `len`-byte record fails: during the erase a third of the time,
    /// else on one of the pages it programs, or (rarely) between record and counter.
    fn cut_point(&mut self, len: usize) -> Cut {
        let pages = (2 + len).div_ceil(PAGE_LEN) as u64;
        match self.dice.below(3 * pages + 1) {
            0 => Cut::BeforeCounter,
            n if n <= pages => {
                #[allow(clippy::cast_precision_loss)]
                let progress = (self.dice.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                Cut::Erase(progress)
            }
            n => Cut::Program(usize::try_from((n - 1) % pages).unwrap_or(0)),
        }
    }

    /// The counter (the highest record counter written).
    pub fn counter(&self) -> u64 {
        self.counter
    }
}

/// The record a slot holds by its length prefix, if that length is plausible.
fn record_in(slot: &[u8]) -> Option<&[u8]> {
    let len = usize::from(u16::from_be_bytes([slot[0], slot[1]]));
    (record::OVERHEAD..=record::MAX_RECORD_LEN)
        .contains(&len)
        .then(|| &slot[2..2 + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flash(cut_rate: f64, seed: u64) -> Flash {
        Flash::new(&[7; 32], "sim-0001", cut_rate, seed).expect("flash")
    }

    #[test]
    fn writes_read_back_newest_first_and_an_erased_flash_is_empty() {
        let mut f = flash(0.0, 1);
        assert_eq!(f.read(), Read::Empty);
        f.write(b"one", [1; 12]).expect("no cut");
        f.write(b"two", [2; 12]).expect("no cut");
        assert_eq!(f.read(), Read::State(b"two".to_vec()));
        assert_eq!(f.counter(), 2);
        f.write(b"three", [3; 12]).expect("no cut");
        assert_eq!(f.read(), Read::State(b"three".to_vec()));
        f.wipe();
        assert_eq!(f.read(), Read::Empty);
    }

    #[test]
    fn every_cut_write_leaves_the_previous_state_or_the_new_one_readable() {
        // Many cuts at random points: the slot being written is torn (erase, program) or
        // whole (before the counter); what reads back is always a whole state.
        let mut cut = 0;
        for seed in 1..400 {
            let mut f = flash(0.0, seed);
            f.write(b"old state", [1; 12]).expect("no cut");
            f.cut_rate = 1.0;
            assert_eq!(f.write(b"new state", [2; 12]), Err(PowerCut));
            cut += 1;
            match f.read() {
                Read::State(s) => assert!(s == b"old state" || s == b"new state", "{s:?}"),
                other => panic!("seed {seed}: {other:?}"),
            }
        }
        assert_eq!(cut, 399);
    }

    #[test]
    fn a_cut_first_write_reads_as_empty_and_a_torn_slot_never_opens() {
        let mut lost_or_empty = 0;
        for seed in 1..100 {
            let mut f = flash(1.0, seed);
            assert_eq!(f.write(b"first", [1; 12]), Err(PowerCut));
            match f.read() {
                // Cut before the counter: the record is whole and opens.
                Read::State(s) => assert_eq!(s, b"first"),
                Read::Empty => lost_or_empty += 1,
                Read::Lost => panic!("nothing was counted as written"),
            }
        }
        assert!(lost_or_empty > 50, "{lost_or_empty}");
    }
}
