//! The device-footprint image: `tessera-shared` used the way firmware uses it, on a generic
//! Cortex-M4F, so `scripts/size-report` measures the flash and static RAM a device pays for
//! the core.
//!
//! The image is a minimal firmware shell around the agent state machine. It opens its stored
//! record and boots the agent from it, connects, receives a hub-signed revocation page (the
//! delta of change 1 of its stream) and heartbeat, checks an access token an app presents
//! (the presentation with proof of possession, and the bare token against the agent's key
//! set and revocation list), lets the refresh timer fire, which makes the agent sign a
//! refresh request, and delivers the hub's answer, whose new state the shell seals into the
//! record. So it links token verification (`token::verify`), request signing
//! (`message::Request::sign` with a `P256Signer`), revocation streams
//! (`revocation::StreamMessage::decode`, `RevocationList::apply_page` and `apply_heartbeat`),
//! the record format (`record::open`, `record::seal`) and `agent::Agent::handle` for Boot,
//! Connected, Message and Timer events.
//!
//! The inputs are real (made by `build.rs` with the same core on the host) and pass through
//! `black_box`, so the optimiser cannot fold the work away; every result ends in
//! `black_box` or a static, so it cannot drop it either. There is no heap and no allocator:
//! the agent and the record buffer are statics, the rest is on the stack.
#![no_std]
#![no_main]

use core::hint::black_box;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m_rt::entry;
use tessera_shared::Error;
use tessera_shared::agent::persisted::MAX_STATE_LEN;
use tessera_shared::agent::{Action, Actions, Agent, AgentConfig, Event};
use tessera_shared::crypto::{P256Signer, PublicKey};
use tessera_shared::record::{self, RecordKey};
use tessera_shared::token::{self, Validation};
use tessera_shared::topic;

mod fixtures {
    include!(concat!(env!("OUT_DIR"), "/fixtures.rs"));
}

/// Room for the device's one record: the largest persisted state, sealed.
const RECORD_BUF_LEN: usize = record::sealed_len(MAX_STATE_LEN);

/// One bit per step that succeeded, for a debugger to read; storing it keeps every step live.
static STEPS_OK: AtomicU32 = AtomicU32::new(0);

#[entry]
fn main() -> ! {
    // Long-lived device state, in static RAM as on a device (the agent is some 12 KiB, too
    // much for a stack); cortex-m-rt hands these to `main` as `&'static mut`, without
    // `unsafe`. The agent's slot is `MaybeUninit`, not `Option`: `None` is not all zero
    // bytes (it lives in a niche of the agent), so an `Option` would go to `.data` and cost
    // its whole size in flash as well; `MaybeUninit::write` fills it safely.
    static mut AGENT: MaybeUninit<Agent<P256Signer>> = MaybeUninit::uninit();
    static mut RECORD_BUF: [u8; RECORD_BUF_LEN] = [0; RECORD_BUF_LEN];

    let steps = run(AGENT, RECORD_BUF).unwrap_or(0);
    STEPS_OK.store(steps, Ordering::Relaxed);
    // As if a debugger reads it: the store cannot be dropped as dead.
    black_box(&STEPS_OK);
    halt()
}

/// Runs the device's steps; returns one bit per step that did what it should.
fn run(
    slot: &'static mut MaybeUninit<Agent<P256Signer>>,
    record_buf: &mut [u8],
) -> Result<u32, Error> {
    let now_ms = black_box(fixtures::NOW) * 1000;
    let mut shell = Shell {
        key: RecordKey::derive(input(&fixtures::DEVICE_SECRET), fixtures::DEVICE_ID)?,
        counter: black_box(fixtures::RECORD_COUNTER),
        record: record_buf,
        published: 0,
        stored: 0,
        next_wake: None,
    };
    let agent = new_agent(slot)?;
    let mut steps = 0;

    // Power-on: open the stored record (authenticated, rollback-checked) and boot from it.
    let stored = input(&fixtures::RECORD);
    let record = shell
        .record
        .get_mut(..stored.len())
        .ok_or(tessera_shared::error::RecordError::TooLarge)?;
    record.copy_from_slice(stored);
    let opened = record::open(&shell.key, fixtures::DEVICE_ID, shell.counter, record)?;
    shell.counter = opened.counter;
    let boot = Event::Boot {
        stored: Some(opened.plaintext),
    };
    let actions = agent.handle(boot, now_ms, &random(1))?;
    shell.perform(&actions)?;
    drop(actions);
    steps |= u32::from(agent.token().is_some());

    shell.perform(&agent.handle(Event::Connected, now_ms, &random(2))?)?;

    // Hub-signed messages of the device's revocation stream arrive: a page (the delta of
    // change 1) and a heartbeat naming change 1. The agent checks each signature with its
    // key set, applies the page to its list and dates its knowledge from the heartbeat.
    for (n, topic, payload) in [
        (3, fixtures::DELTA_TOPIC, &fixtures::SIGNED_PAGE[..]),
        (
            4,
            fixtures::HEARTBEAT_TOPIC,
            &fixtures::SIGNED_HEARTBEAT[..],
        ),
    ] {
        let message = Event::Message {
            topic: input(topic),
            payload: input(payload),
        };
        shell.perform(&agent.handle(message, now_ms, &random(n))?)?;
    }
    steps |= u32::from(
        agent.revocations().seq() == 1 && agent.revocation_fresh_as_of() == Some(fixtures::NOW),
    ) << 1;

    // An app presents its access token: proof of possession, signature, claims,
    // revocation, freshness of the list, replay.
    let presented = agent.check_presentation(
        input(&fixtures::PRESENTATION),
        black_box("door:open"),
        now_ms,
    );
    steps |= u32::from(presented.is_ok()) << 2;

    // The same token checked directly, as a service that receives tokens would.
    let validation =
        Validation::new(now_ms / 1000, fixtures::DEVICE_ID).with_scope(black_box("telemetry:read"));
    let verified = token::verify(input(&fixtures::ACCESS_TOKEN), agent.key_set(), &validation)?;
    verified.check_not_revoked(agent.revocations())?;
    steps |= u32::from(black_box(verified.claims()).exp > 0) << 3;

    // The refresh point passes: the agent signs and publishes a refresh request...
    let published = shell.published;
    let timer_ms = black_box(fixtures::TIMER_AT) * 1000;
    shell.perform(&agent.handle(Event::Timer, timer_ms, &random(5))?)?;
    steps |= u32::from(shell.published > published) << 4;

    // ...and the hub's answer arrives: the agent verifies it and its new token, and asks
    // for the new state to be stored, which the shell seals into the record.
    let response_topic = topic::response(fixtures::DEVICE_ID)?;
    let response = Event::Message {
        topic: &response_topic,
        payload: input(&fixtures::REFRESH_RESPONSE),
    };
    shell.perform(&agent.handle(response, timer_ms, &random(6))?)?;
    steps |= u32::from(shell.stored > 0) << 5;
    black_box(shell.next_wake);
    Ok(steps)
}

fn new_agent(
    slot: &'static mut MaybeUninit<Agent<P256Signer>>,
) -> Result<&'static mut Agent<P256Signer>, Error> {
    let device_key = P256Signer::from_scalar(input(&fixtures::DEVICE_SCALAR))?;
    let hub_key = PublicKey::from_sec1(input(&fixtures::HUB_KEY_SEC1))?;
    let mut config = AgentConfig::new(fixtures::DEVICE_ID, fixtures::AUDIENCE)?;
    // A device with a real-time clock; without one the agent learns the hub's time.
    config.trust_local_clock = black_box(true);
    // Built in its static slot: no 13 KiB temporary on the stack.
    Agent::new_in(slot, config, device_key, hub_key)
}

/// What the device's firmware does with the agent's actions.
struct Shell<'r> {
    key: RecordKey,
    /// The counter of the record last written.
    counter: u64,
    record: &'r mut [u8],
    published: u32,
    stored: u32,
    next_wake: Option<u64>,
}

impl Shell<'_> {
    fn perform(&mut self, actions: &Actions<'_>) -> Result<(), Error> {
        for action in actions {
            match *action {
                // The radio: hand the bytes to the MQTT client.
                Action::Subscribe(topic) => {
                    black_box(topic);
                }
                Action::Publish { topic, payload } => {
                    black_box((topic, payload));
                    self.published += 1;
                }
                Action::Store { plaintext } => {
                    let len = plaintext.len();
                    record::plaintext_mut(self.record)
                        .get_mut(..len)
                        .ok_or(tessera_shared::error::RecordError::TooLarge)?
                        .copy_from_slice(plaintext);
                    self.counter += 1;
                    let sealed = record::seal(
                        &self.key,
                        fixtures::DEVICE_ID,
                        self.counter,
                        black_box([0x4f; record::NONCE_LEN]),
                        self.record,
                        len,
                    )?;
                    // The flash driver writes the record and then the new counter.
                    black_box(&self.record[..sealed]);
                    self.stored += 1;
                }
                Action::Wipe => self.record.fill(0),
                Action::WakeAt(at) => self.next_wake = Some(at),
                Action::Report(report) => {
                    black_box(report);
                }
            }
        }
        Ok(())
    }
}

/// `bytes` as something the optimiser must treat as unknown, like data read from a radio.
fn input<T: ?Sized>(bytes: &'static T) -> &'static T {
    black_box(bytes)
}

/// Bytes from the hardware RNG.
fn random(n: u8) -> [u8; 32] {
    black_box([n; 32])
}

fn halt() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    halt()
}
