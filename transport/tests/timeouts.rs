//! Timeouts, heartbeats and dead peers, on tokio's paused clock: virtual time advances only when
//! every task is idle, so these tests wait minutes of session time in milliseconds, and never
//! sleep for real.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use futures::{SinkExt, StreamExt};
use std::time::Duration;
use support::*;
use tokio::time::Instant;
use vmsync_core::endpoint::{Endpoint, EndpointError, ScanOptions, ScanScope};
use vmsync_protocol::{handshake, Message, RequestBody, Response, ResponseBody};
use vmsync_transport::limits::{
    HANDSHAKE_TIMEOUT_MS, HEARTBEAT_INTERVAL_MS, PEER_SILENCE_LIMIT_MS,
};
use vmsync_transport::{client_handshake, ServerConfig, SessionConfig, TransportError};

const HANDSHAKE: Duration = Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
const HEARTBEAT: Duration = Duration::from_millis(HEARTBEAT_INTERVAL_MS);
const SILENCE: Duration = Duration::from_millis(PEER_SILENCE_LIMIT_MS);

#[tokio::test(start_paused = true)]
async fn client_handshake_times_out() {
    let (a, b) = tokio::io::duplex(PIPE_BYTES);
    // A guest that reads the Hello and never answers.
    let _guest = tokio::spawn(async move {
        let mut g = raw(b);
        while g.next().await.is_some() {}
    });
    let started = Instant::now();
    let r = client_handshake(a, handshake::hello("h", vec![share("src")])).await;
    assert!(
        matches!(
            r,
            Err(TransportError::HandshakeTimeout {
                ms: HANDSHAKE_TIMEOUT_MS
            })
        ),
        "{r:?}"
    );
    assert_eq!(started.elapsed(), HANDSHAKE);
}

#[tokio::test(start_paused = true)]
async fn server_handshake_times_out() {
    let (a, b) = tokio::io::duplex(PIPE_BYTES);
    let started = Instant::now();
    let server = spawn_server(b, Fake::default(), ServerConfig::default());
    let r = server.await.unwrap();
    assert!(
        matches!(r, Err(TransportError::HandshakeTimeout { .. })),
        "{r:?}"
    );
    assert_eq!(started.elapsed(), HANDSHAKE);
    drop(a);
}

#[tokio::test(start_paused = true)]
async fn idle_session_stays_alive_on_heartbeats() {
    let pair = pair(Fake::default()).await;
    let before = pair.session.stats();
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(!pair.session.is_closed());
    let after = pair.session.stats();
    // About one ping and one pong per interval went by.
    let pings = (after.wire_bytes_sent - before.wire_bytes_sent) / 8;
    assert!(
        pings >= 600 / HEARTBEAT.as_secs() - 2,
        "{before:?} {after:?}"
    );
    assert_eq!(after.requests, 0);
    pair.session.ping().await.unwrap();
    assert!(!pair.server.is_finished());
}

#[tokio::test(start_paused = true)]
async fn long_request_is_not_a_dead_guest() {
    let (guest, gate) = Fake::default().gated();
    let pair = pair(guest.clone()).await;
    let mut remote = pair.session.endpoint(0).unwrap();
    let call =
        tokio::spawn(async move { remote.scan(ScanScope::Full, ScanOptions::default()).await });
    guest.wait_started(1).await;
    // Ten minutes of "scanning": far beyond the silence limit, but pings are answered.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(!pair.session.is_closed());
    gate.add_permits(1);
    assert!(call.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn silent_guest_is_declared_dead() {
    let (a, b) = tokio::io::duplex(PIPE_BYTES);
    // A guest that completes the handshake and then never says anything again.
    let _guest = tokio::spawn(async move {
        let mut g = raw(b);
        raw_guest_welcome(&mut g).await;
        while g.next().await.is_some() {}
    });
    let (session, why, elapsed) = full_scan_disconnects(a).await;
    assert!(why.contains("no data from the peer"), "{why}");
    // Declared dead one silence limit after the guest went quiet, plus at most the heartbeat
    // interval before the first unanswered ping.
    assert!(
        elapsed >= SILENCE && elapsed <= SILENCE + HEARTBEAT,
        "{elapsed:?}"
    );
    assert!(session.closed().await.contains("missed heartbeats"));
}

#[tokio::test(start_paused = true)]
async fn guest_that_answers_pings_but_not_requests_hits_the_backstop() {
    let (a, b) = tokio::io::duplex(PIPE_BYTES);
    let _guest = tokio::spawn(async move {
        let mut g = raw(b);
        raw_guest_welcome(&mut g).await;
        while let Some(Ok(Message::Request(r))) = g.next().await {
            if r.body == RequestBody::Ping {
                g.send(Message::Response(Response {
                    id: r.id,
                    body: ResponseBody::Pong,
                }))
                .await
                .unwrap();
            }
        }
    });
    let config = SessionConfig {
        request_timeout: Duration::from_secs(120),
        ..SessionConfig::default()
    };
    let (session, _) = vmsync_transport::client_handshake_with(
        a,
        handshake::hello("h", vec![share("src")]),
        config,
    )
    .await
    .unwrap();
    let mut remote = session.endpoint(0).unwrap();
    let started = Instant::now();
    let r = remote.scan(ScanScope::Full, ScanOptions::default()).await;
    assert_eq!(started.elapsed(), Duration::from_secs(120));
    match r {
        Err(EndpointError::Disconnected(why)) => {
            assert!(why.contains("no answer within 120000 ms"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert!(session.is_closed());
}

#[tokio::test(start_paused = true)]
async fn server_ends_a_session_whose_host_went_silent() {
    let (a, b) = tokio::io::duplex(PIPE_BYTES);
    let server = spawn_server(b, Fake::default(), ServerConfig::default());
    // A host that completes the handshake and then sends nothing, not even pings.
    let _host = raw_host_after_handshake(a).await;
    let started = Instant::now();
    let r = server.await.unwrap();
    match r {
        Err(TransportError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut),
        other => panic!("{other:?}"),
    }
    assert_eq!(started.elapsed(), SILENCE);
}

#[tokio::test(start_paused = true)]
async fn host_that_stops_reading_is_cut_off() {
    // The guest answers a big read while the host never reads: the server's writes stall and
    // it gives up after the silence limit instead of hanging forever.
    let data: Vec<u8> = (0..20 * 4096).map(|i| (i * 7919 % 251) as u8).collect();
    let guest = Fake::with_files(&[("f", data.clone())]);
    let (a, b) = tokio::io::duplex(4096);
    let config = ServerConfig {
        zstd_level: 0,
        ..ServerConfig::default()
    };
    let server = spawn_server(b, guest, config);
    let mut host = raw_host_after_handshake(a).await;
    let reads = manifest_of(&data)
        .chunks
        .into_iter()
        .map(|c| vmsync_protocol::messages::BasedRead {
            read: vmsync_core::endpoint::ChunkRead {
                path: p("f"),
                chunk: c,
            },
            base: None,
        })
        .collect();
    host.send(Message::Request(vmsync_protocol::Request {
        id: 1,
        share: 0,
        body: RequestBody::ReadChunks { reads },
    }))
    .await
    .unwrap();
    // Keep pinging (so the server's reader is happy) but never read a byte.
    let pinger = tokio::spawn(async move {
        for id in 2.. {
            tokio::time::sleep(HEARTBEAT).await;
            let ping = Message::Request(vmsync_protocol::Request {
                id,
                share: 0,
                body: RequestBody::Ping,
            });
            if host.send(ping).await.is_err() {
                break;
            }
        }
    });
    let r = server.await.unwrap();
    match r {
        Err(TransportError::Io(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
            assert!(e.to_string().contains("has not read anything"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    pinger.abort();
}

/// A guest that answers a request a byte every 10 s (inside the 15 s silence limit, so it
/// never looks dead) is cut off once the answer falls below the least rate
/// (`MIN_MESSAGE_BYTES_PER_SEC` after one silence limit), not held until the request's
/// 30-minute backstop.
#[tokio::test(start_paused = true)]
async fn guest_trickling_an_answer_is_cut_off() {
    let (a, b) = tokio::io::duplex(PIPE_BYTES);
    let _guest = tokio::spawn(async move {
        let mut g = raw(b);
        raw_guest_welcome(&mut g).await;
        // Wait for the scan request, then start an answer of 1,000 bytes and trickle it.
        while let Some(Ok(Message::Request(r))) = g.next().await {
            if r.body != RequestBody::Ping {
                break;
            }
        }
        send_raw_bytes(&mut g, &frame_header(1000, false)).await;
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            send_raw_bytes(&mut g, &[0]).await;
        }
    });
    let (_session, why, elapsed) = full_scan_disconnects(a).await;
    assert!(why.contains("arriving too slowly"), "{why}");
    // The first byte after the grace (one silence limit) ends it.
    assert!(
        elapsed > SILENCE && elapsed <= SILENCE + Duration::from_secs(10),
        "{elapsed:?}"
    );
}

/// Opens a session over `stream` and runs a full scan that must end in a disconnect: the
/// session, why, and how long the scan took.
async fn full_scan_disconnects(
    stream: tokio::io::DuplexStream,
) -> (vmsync_transport::Session, String, Duration) {
    let (session, _) = client_handshake(stream, handshake::hello("h", vec![share("src")]))
        .await
        .unwrap();
    let mut remote = session.endpoint(0).unwrap();
    let started = Instant::now();
    let r = remote.scan(ScanScope::Full, ScanOptions::default()).await;
    match r {
        Err(EndpointError::Disconnected(why)) => (session, why, started.elapsed()),
        other => panic!("{other:?}"),
    }
}
