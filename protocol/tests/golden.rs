//! Golden byte vectors: the exact encoding of a fixed `Hello`, `Welcome`, `Refused`, a request of
//! every kind and a response of every kind. Any change to the wire format (a reordered variant, a
//! new field in a core type, a postcard upgrade that changes layout) fails here. If a failure is
//! an intended format change, bump the protocol version and update the vectors in one commit.
#![allow(clippy::unwrap_used)]

use vmsync_core::edits::ManifestEdit;
use vmsync_core::endpoint::{
    Change, ChangeHints, ChunkRead, EndpointError, MissingChunk, Outcome, RootId, ScanOptions,
    ScanScope,
};
use vmsync_core::progress::{Progress, SyncState};
use vmsync_core::{ChunkRef, Entry, FileMeta, Hash, Manifest, RelPath, Timestamp};
use vmsync_protocol::messages::{
    BasedRead, ErrorCode, ManifestForm, ScanDelta, Scanned, StageAnswer, StageFile, WireError,
    WireProblem, MAGIC, PROTOCOL_VERSION_MAX,
};
use vmsync_protocol::{
    decode_message, encode_message, ChunkerParams, Codec, Hello, Message, Refused, Request,
    RequestBody, Response, ResponseBody, ShareOpen, Welcome, WireChunk, WireContent, WireDelta,
};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Encodes `m`, compares with `want` (hex), and checks it decodes back to `m`.
fn golden(name: &str, m: Message, want: &str) {
    let bytes = encode_message(&m, usize::MAX).unwrap();
    assert_eq!(hex(&bytes), want, "{name}: wire format changed");
    let back: Message = decode_message(&bytes).unwrap();
    assert_eq!(back, m, "{name}: does not decode back");
}

fn p(s: &str) -> RelPath {
    RelPath::from_bytes(s.as_bytes()).unwrap()
}

/// The mtime of every entry in these vectors: `80c49fd50c` (seconds, zigzag varint), `7b` (nanos).
const T: Timestamp = Timestamp::new(1_700_000_000, 123);

fn meta() -> FileMeta {
    FileMeta {
        size: 5,
        mode: 0o644,
        mtime: Timestamp::new(1_700_000_000, 123),
        digest: Hash([0x11; 32]),
    }
}

fn chunk_ref() -> ChunkRef {
    ChunkRef {
        hash: Hash([0x22; 32]),
        offset: 0,
        len: 5,
    }
}

fn problem() -> WireProblem {
    WireProblem {
        path: p("d"),
        message: "fifo skipped".into(),
    }
}

fn request(body: RequestBody) -> Message {
    Message::Request(Request {
        id: 7,
        share: 1,
        body,
    })
}

fn response(body: ResponseBody) -> Message {
    Message::Response(Response { id: 7, body })
}

#[test]
fn handshake_messages() {
    assert_eq!(
        PROTOCOL_VERSION_MAX, 2,
        "a new version gets vectors of its own"
    );
    golden(
        "Hello",
        Message::Hello(Hello {
            magic: MAGIC,
            min_version: 2,
            max_version: 2,
            agent_version: "vmsync-host 0.1.0".into(),
            chunker: ChunkerParams::PINNED,
            shares: vec![ShareOpen {
                name: "src".into(),
                ignore: vec!["target/".into(), "*.o".into()],
                respect_gitignore: true,
            }],
        }),
        "00564d53594e430001020211766d73796e632d686f737420302e312e308020808001808004010373726302077461726765742f032a2e6f01",
    );
    golden(
        "Welcome",
        Message::Welcome(Welcome {
            version: 2,
            agent_version: "vmsync-guest 0.1.0".into(),
            chunker: ChunkerParams::PINNED,
        }),
        "010212766d73796e632d677565737420302e312e308020808001808004",
    );
    golden(
        "Refused",
        Message::Refused(Refused {
            reason: "share `x` is not exported by this guest".into(),
        }),
        "0227736861726520607860206973206e6f74206578706f727465642062792074686973206775657374",
    );
}

#[test]
fn requests() {
    golden("Ping", request(RequestBody::Ping), "03070100");
    golden(
        "Scan",
        request(RequestBody::Scan {
            scope: ScanScope::Paths(vec![p("a"), p("a/b")]),
            options: ScanOptions {
                create_marker: true,
            },
        }),
        "030701010102016103612f6201",
    );
    golden(
        "ScanFull",
        request(RequestBody::ScanFull {
            options: ScanOptions {
                create_marker: true,
            },
            base: Some(7),
        }),
        "03070102010107",
    );
    golden("Manifests", request(RequestBody::Manifests { files: vec![(p("a/b"), meta())] }), "030701030103612f6205a40380c49fd50c7b1111111111111111111111111111111111111111111111111111111111111111");
    golden(
        "ReadChunks",
        request(RequestBody::ReadChunks {
            reads: vec![
                BasedRead { read: ChunkRead { path: p("a/b"), chunk: chunk_ref() }, base: Some(vec![0x72, 0x73]) },
                BasedRead { read: ChunkRead { path: p("c"), chunk: chunk_ref() }, base: None },
            ],
        }),
        "030701040203612f62222222222222222222222222222222222222222222222222222222222222222200050102727301632222222222222222222222222222222222222222222222222222222222222222000500",
    );
    golden(
        "Stage",
        request(RequestBody::Stage {
            files: vec![StageFile {
                path: p("a/b"),
                meta: meta(),
                manifest: ManifestForm::Full(Manifest { chunks: vec![chunk_ref()], links: vec![] }),
            }],
        }),
        "030701050103612f6205a40380c49fd50c7b111111111111111111111111111111111111111111111111111111111111111100012222222222222222222222222222222222222222222222222222222222222222000500",
    );
    golden(
        "Stage with edits",
        request(RequestBody::Stage {
            files: vec![StageFile {
                path: p("a/b"),
                meta: meta(),
                manifest: ManifestForm::Edits {
                    base_size: 70_000,
                    base_digest: Hash([0x55; 32]),
                    edits: vec![
                        ManifestEdit::Copy { start: 0, count: 40 },
                        ManifestEdit::New(vec![(Hash([0x22; 32]), 5)]),
                        ManifestEdit::Copy { start: 41, count: 300 },
                    ],
                },
            }],
        }),
        "030701050103612f6205a40380c49fd50c7b111111111111111111111111111111111111111111111111111111111111111101f0a20455555555555555555555555555555555555555555555555555555555555555550300002801012222222222222222222222222222222222222222222222222222222222222222050029ac02",
    );
    golden(
        "Supply",
        request(RequestBody::Supply {
            chunks: vec![
                WireContent::Whole(WireChunk { hash: Hash([0x33; 32]), len: 3, codec: Codec::Raw, data: b"abc".to_vec() }),
                WireContent::Delta(WireDelta { hash: Hash([0x44; 32]), len: 10, codec: Codec::Zstd, data: vec![0x28, 0xb5] }),
            ],
        }),
        "03070106020033333333333333333333333333333333333333333333333333333333333333330300036162630144444444444444444444444444444444444444444444444444444444444444440a010228b5",
    );
    golden(
        "Transition",
        request(RequestBody::Transition {
            changes: vec![
                Change { path: p("a/b"), expected: None, new: Some(Entry::File(meta())) },
                Change {
                    path: p("c"),
                    expected: Some(Entry::Symlink { target: b"x".to_vec(), mtime: T }),
                    new: None,
                },
                Change { path: p("d"), expected: None, new: Some(Entry::Dir { mode: 0o755, mtime: T }) },
            ],
        }),
        "030701070303612f6200010005a40380c49fd50c7b111111111111111111111111111111111111111111111111111111111111111101630102017880c49fd50c7b000164000101ed0380c49fd50c7b",
    );
    golden(
        "PollChanges",
        request(RequestBody::PollChanges {
            max_wait_ms: 25_000,
        }),
        "03070108a8c301",
    );
    golden(
        "Mark",
        request(RequestBody::Mark { generation: 300 }),
        "03070109ac02",
    );
    golden(
        "NoteSync (syncing, with progress)",
        request(RequestBody::NoteSync(SyncState::Syncing(Some(Progress {
            files_done: 1,
            files_total: 2,
            bytes_done: 3,
            bytes_total: 300,
        })))),
        "0307010a0001010203ac02",
    );
    golden(
        "NoteSync (in sync)",
        request(RequestBody::NoteSync(SyncState::InSync)),
        "0307010a01",
    );
    golden(
        "NoteSync (conflicted)",
        request(RequestBody::NoteSync(SyncState::Conflicted {
            conflicts: 3,
        })),
        "0307010a0203",
    );
    golden(
        "NoteSync (halted)",
        request(RequestBody::NoteSync(SyncState::Halted {
            code: "disk-full".into(),
        })),
        "0307010a03096469736b2d66756c6c",
    );
}

#[test]
fn responses() {
    golden("Pong", response(ResponseBody::Pong), "040700");
    golden(
        "Scanned",
        response(ResponseBody::Scanned(Ok(Scanned {
            root: Some(RootId { marker: [0x55; 16], dev: 2049, ino: 12345 }),
            entries: vec![
                (p("a"), Entry::Dir { mode: 0o755, mtime: T }),
                (p("a/b"), Entry::File(meta())),
                (p("c"), Entry::Symlink { target: b"a/b".to_vec(), mtime: T }),
            ],
            problems: vec![problem()],
            ignored: vec![p("e")],
            generation: Some(300),
            manifests: vec![(p("a/b"), Manifest { chunks: vec![chunk_ref()], links: vec![] })],
        }))),
        "0407010001555555555555555555555555555555558110b96003016101ed0380c49fd50c7b03612f620005a40380c49fd50c7b111111111111111111111111111111111111111111111111111111111111111101630203612f6280c49fd50c7b0101640c6669666f20736b697070656401016501ac020103612f62012222222222222222222222222222222222222222222222222222222222222222000500",
    );
    golden(
        "ScanDelta",
        response(ResponseBody::ScanDelta(Ok(ScanDelta {
            token: 9,
            base: Some(7),
            root: None,
            changed: vec![(p("a/b"), Entry::File(meta()))],
            removed: vec![p("c")],
            problems: vec![problem()],
            ignored: vec![p("e")],
            generation: Some(7),
        }))),
        "04070200090107000103612f620005a40380c49fd50c7b11111111111111111111111111111111111111111111111111111111111111110101630101640c6669666f20736b69707065640101650107",
    );
    golden(
        "Manifests",
        response(ResponseBody::Manifests(Ok(vec![
            Ok(Manifest { chunks: vec![chunk_ref()], links: vec![] }),
            Err(problem()),
        ]))),
        "0407030002000122222222222222222222222222222222222222222222222222222222222222220005000101640c6669666f20736b6970706564",
    );
    golden(
        "Chunks",
        response(ResponseBody::Chunks(Ok(vec![
            Some(WireContent::Whole(WireChunk { hash: Hash([0x22; 32]), len: 5, codec: Codec::Raw, data: b"hello".to_vec() })),
            Some(WireContent::Delta(WireDelta { hash: Hash([0x22; 32]), len: 2, codec: Codec::Raw, data: vec![0, 9] })),
            None,
        ]))),
        "04070400030100222222222222222222222222222222222222222222222222222222222222222205000568656c6c6f01012222222222222222222222222222222222222222222222222222222222222222020002000900",
    );
    golden(
        "Staged",
        response(ResponseBody::Staged(Ok(vec![
            StageAnswer::Missing(vec![
                MissingChunk { hash: Hash([0x22; 32]), base: Some(vec![1, 2, 3]) },
                MissingChunk { hash: Hash([0x33; 32]), base: None },
            ]),
            StageAnswer::Problem(problem()),
            StageAnswer::BaseUnknown,
            StageAnswer::NoRoom,
        ]))),
        "04070500040002222222222222222222222222222222222222222222222222222222222222222201030102033333333333333333333333333333333333333333333333333333333333333333000101640c6669666f20736b69707065640203",
    );
    golden(
        "Supplied",
        response(ResponseBody::Supplied(Ok(vec![Hash([0x44; 32])]))),
        "04070600014444444444444444444444444444444444444444444444444444444444444444",
    );
    golden(
        "Transitioned",
        response(ResponseBody::Transitioned(Ok(vec![
            Outcome::Applied,
            Outcome::Changed(None),
            Outcome::Changed(Some(Entry::Dir {
                mode: 0o700,
                mtime: T,
            })),
            Outcome::Failed("disk full".into()),
        ]))),
        "0407070004000100010101c00380c49fd50c7b02096469736b2066756c6c",
    );
    golden(
        "Changes",
        response(ResponseBody::Changes(Ok(ChangeHints {
            paths: vec![p("a/b"), p("c")],
            rescan: false,
        }))),
        "040708000203612f62016300",
    );
    golden("Marked", response(ResponseBody::Marked(Ok(()))), "04070900");
    golden("Noted", response(ResponseBody::Noted(Ok(()))), "04070a00");
}

/// Errors travel as a code and a message ([`WireError`]), made from the core error and back.
#[test]
fn errors() {
    let errors = [
        (EndpointError::RootMissing("r".into()), "04070901000172"),
        (EndpointError::RootNotDir("r".into()), "04070901010172"),
        (EndpointError::UnknownShare("r".into()), "04070901020172"),
        (EndpointError::Disconnected("r".into()), "04070901030172"),
        (EndpointError::Protocol("r".into()), "04070901040172"),
        (EndpointError::Io("r".into()), "04070901050172"),
        (EndpointError::Limit("r".into()), "04070901060172"),
        // A side below its free-space reserve: varint free, then reserve, and no message.
        (
            EndpointError::DiskFull {
                free: 1,
                reserve: 300,
            },
            "040709010701ac0200",
        ),
    ];
    for (e, want) in errors {
        let wire = WireError::from(e.clone());
        assert_eq!(EndpointError::from(wire.clone()), e, "{e:?} round trip");
        golden(
            &format!("{e:?}"),
            response(ResponseBody::Marked(Err(wire))),
            want,
        );
    }
    assert_eq!(
        WireError::from(EndpointError::DiskFull {
            free: 1,
            reserve: 300
        })
        .code,
        ErrorCode::DiskFull {
            free: 1,
            reserve: 300
        }
    );
}
