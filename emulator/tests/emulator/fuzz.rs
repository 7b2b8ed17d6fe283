//! Fuzz targets (property tests) for the emulator: the frame, performative and message
//! decoders on arbitrary and on mutated valid bytes, and the connection state machine on
//! arbitrary sequences of performatives and frames. The emulator never panics or hangs;
//! only the offending connection closes, and a fresh one opens, begins and attaches.
//! Cases: `PROPTEST_CASES` (256 by default; the connection target runs a tenth of them,
//! each over TCP); RELIABILITY.md gives the long run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fe2o3_amqp_types::definitions::Role;
use fe2o3_amqp_types::performatives::{
    Begin, ChannelMax, Close, Detach, Disposition, End, Flow, MaxFrameSize, Open, Performative,
    Transfer,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use servicebus_emulator::codec::{self, AMQP_HEADER};
use servicebus_emulator::message::AmqpMessage;
use servicebus_emulator::{QueueConfig, Topology};

use crate::protocol::{Raw, attach};

/// How long a fresh connection may take to open, begin and attach after a fuzzed one.
const HEALTHY_WITHIN: Duration = Duration::from_secs(10);
/// How long a fuzzed connection is given to take its steps and answer.
const STEPS_WITHIN: Duration = Duration::from_secs(5);

fn performative() -> impl Strategy<Value = Performative> {
    // Mostly the two attached links' handles (0 and 1).
    let handle = prop_oneof![6 => 0u32..2, 1 => 2u32..4];
    prop_oneof![
        1 => (any::<Option<u32>>(), 0u32..70_000, 0u16..8).prop_map(|(idle, frame, channels)| {
            Performative::Open(Open {
                container_id: "fuzz".into(),
                hostname: None,
                max_frame_size: MaxFrameSize(frame),
                channel_max: ChannelMax(channels),
                idle_time_out: idle,
                outgoing_locales: None,
                incoming_locales: None,
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            })
        }),
        2 => (any::<Option<u16>>(), any::<u32>(), any::<u32>()).prop_map(|(remote, next, window)| {
            Performative::Begin(Begin {
                remote_channel: remote,
                next_outgoing_id: next,
                incoming_window: window,
                outgoing_window: window,
                handle_max: Default::default(),
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            })
        }),
        4 => (
            handle.clone(),
            any::<bool>(),
            prop_oneof![
                Just("q".to_string()),
                Just("$cbs".to_string()),
                Just("q/$management".to_string()),
                "[ -~]{0,12}"
            ]
        )
            .prop_map(|(handle, sender, address)| {
                let role = if sender { Role::Sender } else { Role::Receiver };
                Performative::Attach(attach(&format!("fuzz-{handle}"), handle, role, &address))
            }),
        3 => (
            prop::option::of(handle.clone()),
            any::<u32>(),
            prop::option::of(any::<u32>()),
            any::<bool>()
        )
            .prop_map(|(handle, window, credit, drain)| {
                Performative::Flow(Flow {
                    next_incoming_id: Some(0),
                    incoming_window: window,
                    next_outgoing_id: 0,
                    outgoing_window: window,
                    handle: handle.map(Into::into),
                    delivery_count: Some(0),
                    link_credit: credit,
                    available: None,
                    drain,
                    echo: false,
                    properties: None,
                })
            }),
        4 => (
            handle.clone(),
            prop_oneof![4 => (0u32..8).prop_map(Some), 1 => any::<Option<u32>>()],
            prop_oneof![4 => Just(Some(0)), 1 => Just(Some(0x8001_3700)), 1 => any::<Option<u32>>()],
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(handle, id, format, settled, more)| {
                Performative::Transfer(Transfer {
                    handle: handle.into(),
                    delivery_id: id,
                    delivery_tag: id
                        .map(|id| serde_bytes::ByteBuf::from(id.to_be_bytes().to_vec())),
                    message_format: format,
                    settled: Some(settled),
                    more,
                    rcv_settle_mode: None,
                    state: None,
                    resume: false,
                    aborted: false,
                    batchable: false,
                })
            }),
        2 => (0u32..8, prop::option::of(0u32..8), any::<bool>()).prop_map(
            |(first, last, settled)| {
                Performative::Disposition(Disposition {
                    role: Role::Receiver,
                    first,
                    last,
                    settled,
                    state: None,
                    batchable: false,
                })
            }
        ),
        2 => (handle, any::<bool>()).prop_map(|(handle, closed)| {
            Performative::Detach(Detach {
                handle: handle.into(),
                closed,
                error: None,
            })
        }),
        1 => Just(Performative::End(End { error: None })),
        1 => Just(Performative::Close(Close { error: None })),
    ]
}

/// A step of a fuzzed connection.
#[derive(Debug, Clone)]
enum Step {
    /// A performative with a payload (a message, for a transfer).
    Performative(u16, Performative, Vec<u8>),
    /// A valid performative's frame body with some bytes changed or cut.
    Mutated(u16, Performative, Vec<(usize, u8)>, Option<usize>),
    /// Any bytes, framed.
    Frame(u16, Vec<u8>),
    /// Any bytes, unframed.
    Raw(Vec<u8>),
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        // An AMQP value section holding a string.
        "[a-z]{0,20}".prop_map(|text| {
            let mut section = vec![0x00, 0x53, 0x77, 0xa1, text.len() as u8];
            section.extend(text.as_bytes());
            section
        }),
        vec(any::<u8>(), 0..64),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let channel = prop_oneof![9 => Just(0u16), 1 => 0u16..4];
    prop_oneof![
        8 => (channel.clone(), performative(), payload()).prop_map(|(c, p, b)| Step::Performative(c, p, b)),
        1 => (channel.clone(), performative(), vec((any::<usize>(), any::<u8>()), 1..4), prop::option::of(any::<usize>()))
            .prop_map(|(c, p, changes, cut)| Step::Mutated(c, p, changes, cut)),
        1 => (channel, vec(any::<u8>(), 0..64)).prop_map(|(c, b)| Step::Frame(c, b)),
        1 => vec(any::<u8>(), 0..32).prop_map(Step::Raw),
    ]
}

/// The bytes of `step` on the wire.
fn wire(step: &Step) -> Vec<u8> {
    let mut out = BytesMut::new();
    match step {
        Step::Performative(channel, p, payload) => {
            codec::write_performative(&mut out, *channel, p, payload)
        }
        Step::Mutated(channel, p, changes, cut) => {
            let mut body = codec::encode(p);
            for (at, byte) in changes {
                if !body.is_empty() {
                    let i = at % body.len();
                    body[i] = *byte;
                }
            }
            if let Some(cut) = cut {
                body.truncate(cut % (body.len() + 1));
            }
            codec::write_frame(&mut out, codec::FRAME_TYPE_AMQP, *channel, &[&body]);
        }
        Step::Frame(channel, body) => {
            codec::write_frame(&mut out, codec::FRAME_TYPE_AMQP, *channel, &[body])
        }
        Step::Raw(bytes) => out.extend_from_slice(bytes),
    }
    out.to_vec()
}

/// Panics on the emulator's threads (named `fuzz-emulator`) since the hook was set.
static EMULATOR_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_emulator_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("fuzz-emulator"))
        {
            EMULATOR_PANICS.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));
}

fn cases(divide: u32) -> u32 {
    (Config::default().cases / divide).max(1)
}

proptest! {
    #![proptest_config(Config::with_cases(cases(1)))]

    #[test]
    fn fuzz_decoders_take_arbitrary_bytes(bytes in vec(any::<u8>(), 0..256)) {
        let bytes = Bytes::from(bytes);
        let _ = codec::decode_performative(&bytes);
        let _ = codec::split_sections(&bytes);
        let _ = AmqpMessage::decode(&bytes);
        let _ = AmqpMessage::decode_batch(&bytes);
        if let Ok(header) = <[u8; 8]>::try_from(&bytes[..bytes.len().min(8)]) {
            let _ = codec::parse_frame_header(&header, 65_536);
        }
    }

    #[test]
    fn fuzz_decoders_take_mutated_performatives(step in step()) {
        let bytes = Bytes::from(wire(&step));
        // The frame body: past the 8-byte header, as the connection hands it over.
        let body = bytes.slice(bytes.len().min(8)..);
        if let Ok((_, payload)) = codec::decode_performative(&body) {
            let _ = AmqpMessage::decode(&payload);
            let _ = AmqpMessage::decode_batch(&payload);
        }
    }
}

#[test]
fn fuzz_connections_with_arbitrary_steps_close_alone() {
    count_emulator_panics();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fuzz-emulator")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => panic!("a runtime: {e}"),
    };
    let emulator = runtime.block_on(crate::common::start_ephemeral(Topology {
        queues: vec![QueueConfig::new("q")],
        ..Default::default()
    }));
    let addr = emulator.local_addr();
    let mut runner = TestRunner::new(Config::with_cases(cases(10)));
    let sequence = (prop::bool::weighted(0.8), vec(step(), 1..24));
    let outcome = runner.run(&sequence, |(opened, steps)| {
        let panics = EMULATOR_PANICS.load(Ordering::SeqCst);
        runtime.block_on(async {
            let mut fuzzed = Raw::connect(addr).await;
            if opened {
                // Most sequences start on an open connection with a session, to reach
                // the link and delivery states.
                fuzzed.open(None).await;
                fuzzed.begin(0).await;
                // ... and a sender (handle 0) and a receiver (handle 1) attached to `q`.
                for (handle, role) in [(0, Role::Sender), (1, Role::Receiver)] {
                    let link = attach(&format!("fuzz-{handle}"), handle, role, "q");
                    fuzzed.send(0, Performative::Attach(link), &[]).await;
                    loop {
                        match fuzzed.performative().await {
                            Some(Performative::Attach(_)) => break,
                            Some(Performative::Flow(_)) => continue,
                            other => prop_assert!(false, "an attach, not {:?}", other),
                        }
                    }
                }
            } else {
                fuzzed.write(&AMQP_HEADER).await;
                let header = fuzzed.read_exact_n(8).await;
                prop_assert_eq!(header.as_deref(), Some(&AMQP_HEADER[..]));
            }
            let steps_taken = tokio::time::timeout(STEPS_WITHIN, async {
                for step in &steps {
                    // A write may fail once the emulator closed the connection.
                    if !fuzzed.try_write(&wire(step)).await {
                        break;
                    }
                }
                // Drain what the emulator answers until it closes or goes quiet.
                while tokio::time::timeout(Duration::from_millis(200), fuzzed.frame())
                    .await
                    .is_ok_and(|frame| frame.is_some())
                {}
            })
            .await;
            prop_assert!(steps_taken.is_ok(), "the fuzzed connection hung");
            drop(fuzzed);
            let healthy = tokio::time::timeout(HEALTHY_WITHIN, async {
                let mut fresh = Raw::connect(addr).await;
                fresh.open(None).await;
                fresh.begin(0).await;
                fresh
                    .send(
                        0,
                        Performative::Attach(attach("after-fuzz", 0, Role::Sender, "q")),
                        &[],
                    )
                    .await;
                matches!(fresh.performative().await, Some(Performative::Attach(_)))
            })
            .await;
            prop_assert_eq!(healthy, Ok(true), "a fresh connection after {:?}", steps);
            prop_assert_eq!(
                EMULATOR_PANICS.load(Ordering::SeqCst),
                panics,
                "the emulator panicked"
            );
            Ok(())
        })
    });
    runtime.block_on(emulator.shutdown());
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
