//! The HTTPS sink against a simulated ERP: a real HTTPS server on loopback
//! with a certificate from a throwaway CA.

use std::collections::HashSet;
use std::time::Duration;

use buffer::{AppendRequest, EventClass, Journal, JournalConfig, NewEvent};
use plant_edge_tests::drive;
use plant_edge_tests::erp::{Erp, Scripted};
use plant_edge_tests::pki::{self, Pki};
use protocols::sinks::https::{HttpsAuth, HttpsMode, HttpsSink, HttpsSinkConfig};
use protocols::tls::TlsSettings;
use protocols::{Sink, Verdict};

const SINK: &str = "erp";

fn config(erp: &Erp, pki: &Pki, mode: HttpsMode) -> HttpsSinkConfig {
    HttpsSinkConfig {
        url: erp.url(),
        mode,
        headers: vec![("X-Plant".into(), "plant1".into())],
        gzip: false,
        auth: HttpsAuth::None,
        tls: TlsSettings {
            ca_file: Some(pki.ca.clone()),
            ..TlsSettings::default()
        },
        insecure_skip_verify: false,
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        max_events_per_second: None,
        profile: Default::default(),
    }
}

/// Events from two sources, interleaved; payload carries source and n.
fn journal_with(dir: &std::path::Path, total: u64) -> (Journal, Vec<String>) {
    let mut jc = JournalConfig::new(dir.join("journal"));
    jc.sinks = vec![SINK.into()];
    let journal = Journal::open(jc).expect("journal");
    let routes = journal.routes_all();
    let mut ids = Vec::new();
    let mut n = 0;
    while n < total {
        let events: Vec<NewEvent> = (n..(n + 500).min(total))
            .map(|i| {
                let id = uuid::Uuid::from_u128(i as u128 + 1);
                ids.push(id.to_string());
                let source = if i % 2 == 0 { "press1" } else { "press2" };
                NewEvent {
                    id,
                    class: EventClass::Business,
                    routes,
                    payload: format!("{{\"specversion\":\"1.0\",\"id\":\"{id}\",\"source\":\"urn:plant-edge:p:g:{source}\",\"type\":\"production.completion\",\"data\":{{\"n\":{i}}}}}").into_bytes(),
                    ledger: None,
                }
            })
            .collect();
        journal
            .append_blocking(AppendRequest {
                source: "mixed".into(),
                events,
                cursor: None,
            })
            .expect("append")
            .expect("fits");
        n += 500;
    }
    (journal, ids)
}

fn drained(journal: &Journal) -> bool {
    journal.backlog(SINK).expect("backlog") == 0
}

fn setup() -> (tempfile::TempDir, Pki) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki::generate(dir.path(), "erp");
    (dir, pki)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_in_batches_arrive_once_each_in_per_source_order() {
    let (dir, pki) = setup();
    let erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    let (journal, ids) = journal_with(dir.path(), 10_000);
    let mut cfg = config(
        &erp,
        &pki,
        HttpsMode::Batch {
            max_events: 200,
            max_bytes: 64 * 1024,
        },
    );
    cfg.gzip = true;
    let mut sink = HttpsSink::new(cfg).expect("sink");
    assert!(drive::until(&journal, SINK, &mut sink, Duration::from_secs(120), drained).await);
    let posted = erp.posted();
    assert_eq!(posted.len(), 10_000, "each id exactly once");
    assert_eq!(
        posted
            .iter()
            .map(|(id, _)| id.clone())
            .collect::<HashSet<_>>(),
        ids.iter().cloned().collect::<HashSet<_>>()
    );
    for source in ["press1", "press2"] {
        let order: Vec<&String> = posted
            .iter()
            .filter(|(_, s)| s.ends_with(source))
            .map(|(id, _)| id)
            .collect();
        let expected: Vec<&String> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| (i % 2 == 0) == (source == "press1"))
            .map(|(_, id)| id)
            .collect();
        assert_eq!(order, expected, "{source} in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_storms_rate_limits_and_an_outage_lose_nothing() {
    let (dir, pki) = setup();
    let mut erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    let (journal, ids) = journal_with(dir.path(), 3_000);
    {
        let mut script = erp.state.script.lock().expect("script");
        script.extend([Scripted::Status(503); 6]);
        script.push_back(Scripted::TooManyRequests(1));
        script.extend([Scripted::Status(502), Scripted::Status(408)]);
    }
    let mut sink = HttpsSink::new(config(
        &erp,
        &pki,
        HttpsMode::Batch {
            max_events: 100,
            max_bytes: 1 << 20,
        },
    ))
    .expect("sink");
    // The ERP goes down for a while mid-stream.
    let journal2 = journal.clone();
    let outage = async {
        while journal2.backlog(SINK).expect("backlog") > 2_000 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        erp.stop();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        erp.start_again();
        erp
    };
    let (done, erp) = tokio::join!(
        drive::until(&journal, SINK, &mut sink, Duration::from_secs(120), drained),
        outage
    );
    assert!(done, "drained after storms and outage");
    let posted: HashSet<String> = erp.posted().into_iter().map(|(id, _)| id).collect();
    assert_eq!(
        posted,
        ids.into_iter().collect::<HashSet<_>>(),
        "nothing lost"
    );
    assert!(
        journal.dead_letters().expect("dead").is_empty(),
        "transient failures are never dead letters"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_poison_event_in_a_batch_of_500_is_the_only_dead_letter() {
    let (dir, pki) = setup();
    let erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    let (journal, ids) = journal_with(dir.path(), 500);
    erp.state
        .poison
        .lock()
        .expect("poison")
        .insert(ids[321].clone());
    let mut sink = HttpsSink::new(config(
        &erp,
        &pki,
        HttpsMode::Batch {
            max_events: 500,
            max_bytes: 1 << 20,
        },
    ))
    .expect("sink");
    let batch = journal.read_batch(SINK, 500).expect("read");
    assert_eq!(batch.len(), 500);
    let verdicts = sink.deliver(&batch).await;
    let rejected: Vec<usize> = verdicts
        .iter()
        .enumerate()
        .filter(|(_, v)| matches!(v, Verdict::Rejected { .. }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(rejected, vec![321]);
    assert_eq!(
        verdicts
            .iter()
            .filter(|v| **v == Verdict::Delivered)
            .count(),
        499
    );
    match &verdicts[321] {
        Verdict::Rejected { reason } => assert!(
            reason.starts_with("HTTP 422") && reason.contains("unknown material"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(erp.posted().len(), 499);
    let requests = *erp.state.requests.lock().expect("requests");
    assert!(
        requests <= 1 + 2 * 9 + 1,
        "bisection, not one request per event ({requests})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_token_revoked_mid_stream_is_refreshed_and_nothing_is_lost() {
    let (dir, pki) = setup();
    let erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    *erp.state.require_token.lock().expect("state") = true;
    *erp.state.token_life.lock().expect("state") = Duration::from_millis(300);
    let (journal, ids) = journal_with(dir.path(), 2_000);
    let mut cfg = config(
        &erp,
        &pki,
        HttpsMode::Batch {
            max_events: 50,
            max_bytes: 1 << 20,
        },
    );
    cfg.auth = HttpsAuth::OAuth2 {
        token_url: erp.token_url(),
        client_id: "gw01".into(),
        client_secret: "s3cret".into(),
        scope: Some("erp.post".into()),
    };
    cfg.max_events_per_second = Some(2_000);
    let mut sink = HttpsSink::new(cfg).expect("sink");
    assert!(drive::until(&journal, SINK, &mut sink, Duration::from_secs(60), drained).await);
    let posted: HashSet<String> = erp.posted().into_iter().map(|(id, _)| id).collect();
    assert_eq!(posted, ids.into_iter().collect::<HashSet<_>>());
    let issued = erp.state.tokens.lock().expect("tokens").len();
    assert!(
        issued >= 2,
        "the token was refreshed after the server revoked it ({issued} issued)"
    );
    assert!(
        *erp.state.unauthorized.lock().expect("state") >= 1,
        "the revocation was noticed through a 401"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_a_clear_error_and_a_retry() {
    let (dir, pki) = setup();
    let stranger = pki::generate(dir.path(), "stranger");
    let erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    let (journal, _) = journal_with(dir.path(), 1);
    let mut cfg = config(&erp, &pki, HttpsMode::Single);
    cfg.tls.ca_file = Some(stranger.ca.clone());
    let mut sink = HttpsSink::new(cfg).expect("sink");
    let verdicts = sink
        .deliver(&journal.read_batch(SINK, 1).expect("read"))
        .await;
    match &verdicts[0] {
        Verdict::Retry { reason, .. } => assert!(
            reason.contains("certificate") && reason.contains("ca_file"),
            "unclear: {reason}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(erp.posted().is_empty());
}

fn batch_mode() -> HttpsMode {
    HttpsMode::Batch {
        max_events: 100,
        max_bytes: 1 << 20,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_an_endpoint_error_never_a_delivery() {
    let (dir, pki) = setup();
    let erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    *erp.state.redirect_to.lock().expect("state") = Some(erp.login_url());
    let (journal, ids) = journal_with(dir.path(), 30);
    for mode in [HttpsMode::Single, batch_mode()] {
        let mut sink = HttpsSink::new(config(&erp, &pki, mode)).expect("sink");
        let batch = journal.read_batch(SINK, 30).expect("read");
        let verdicts = sink.deliver(&batch).await;
        journal.rewind(SINK).expect("rewind");
        match &verdicts[0] {
            Verdict::Hold { reason } => assert!(
                reason.contains("HTTP 301") && reason.contains("/login"),
                "the message names the Location: {reason}"
            ),
            other => panic!("a redirect must hold, not {other:?}"),
        }
        assert!(
            verdicts
                .iter()
                .all(|v| matches!(v, Verdict::Hold { .. } | Verdict::Retry { .. })),
            "nothing delivered, nothing rejected: {verdicts:?}"
        );
    }
    assert!(erp.posted().is_empty(), "the ERP received nothing");
    assert_eq!(journal.backlog(SINK).expect("backlog"), 30, "all kept");
    // The proxy is fixed: everything arrives, nothing was dead-lettered.
    *erp.state.redirect_to.lock().expect("state") = None;
    let mut sink = HttpsSink::new(config(&erp, &pki, batch_mode())).expect("sink");
    assert!(drive::until(&journal, SINK, &mut sink, Duration::from_secs(30), drained).await);
    let posted: HashSet<String> = erp.posted().into_iter().map(|(id, _)| id).collect();
    assert_eq!(posted, ids.into_iter().collect::<HashSet<_>>());
    assert!(journal.dead_letters().expect("dead").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_credentials_hold_the_backlog_and_dead_letter_nothing() {
    let (dir, pki) = setup();
    let erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    let (journal, ids) = journal_with(dir.path(), 32);
    for status in [403u16, 404, 401, 405, 410] {
        *erp.state.refuse_all.lock().expect("state") = Some(status);
        let mut cfg = config(&erp, &pki, batch_mode());
        cfg.auth = HttpsAuth::Basic {
            user: "gw01".into(),
            password: "revoked".into(),
        };
        let mut sink = HttpsSink::new(cfg).expect("sink");
        let batch = journal.read_batch(SINK, 32).expect("read");
        let verdicts = sink.deliver(&batch).await;
        journal.rewind(SINK).expect("rewind");
        assert_eq!(verdicts.len(), 32);
        assert!(
            verdicts
                .iter()
                .all(|v| matches!(v, Verdict::Hold { reason } if reason.starts_with(&format!("HTTP {status}")))),
            "HTTP {status} is about the endpoint: {:?}",
            verdicts[0]
        );
    }
    assert!(journal.dead_letters().expect("dead").is_empty());
    *erp.state.refuse_all.lock().expect("state") = None;
    let mut sink = HttpsSink::new(config(&erp, &pki, batch_mode())).expect("sink");
    assert!(drive::until(&journal, SINK, &mut sink, Duration::from_secs(30), drained).await);
    let posted: HashSet<String> = erp.posted().into_iter().map(|(id, _)| id).collect();
    assert_eq!(posted, ids.into_iter().collect::<HashSet<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_413_splits_the_batch_until_it_fits() {
    let (dir, pki) = setup();
    let erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    let (journal, ids) = journal_with(dir.path(), 100);
    // About 25 of these events fit in one request.
    *erp.state.max_body.lock().expect("state") = Some(4_000);
    let mut sink = HttpsSink::new(config(&erp, &pki, batch_mode())).expect("sink");
    let verdicts = sink
        .deliver(&journal.read_batch(SINK, 100).expect("read"))
        .await;
    assert!(
        verdicts.iter().all(|v| *v == Verdict::Delivered),
        "{:?}",
        verdicts.iter().find(|v| **v != Verdict::Delivered)
    );
    let posted: Vec<String> = erp.posted().into_iter().map(|(id, _)| id).collect();
    assert_eq!(posted, ids, "all of them, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_error_body_is_read_only_up_to_its_bound() {
    let (dir, pki) = setup();
    let erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    *erp.state.endless_error_body.lock().expect("state") = true;
    let (journal, _) = journal_with(dir.path(), 3);
    let mut cfg = config(&erp, &pki, batch_mode());
    // Far beyond the test's patience: only the body bound ends the read.
    cfg.request_timeout = Duration::from_secs(600);
    let mut sink = HttpsSink::new(cfg).expect("sink");
    let batch = journal.read_batch(SINK, 3).expect("read");
    let verdicts = tokio::time::timeout(Duration::from_secs(60), sink.deliver(&batch))
        .await
        .expect("the answer comes without reading the whole body");
    match &verdicts[0] {
        Verdict::Retry { reason, .. } => {
            assert!(reason.starts_with("HTTP 503: xxx"), "{reason}");
            assert!(reason.len() < 300, "the reason keeps only the start");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_claims_to_live_forever_is_believed_for_a_day_not_a_panic() {
    let (dir, pki) = setup();
    let erp = Erp::start(&pki.server_cert, &pki.server_key).await;
    *erp.state.require_token.lock().expect("state") = true;
    *erp.state.token_expires_in.lock().expect("state") = Some(u64::MAX);
    let (journal, ids) = journal_with(dir.path(), 10);
    let mut cfg = config(&erp, &pki, batch_mode());
    cfg.auth = HttpsAuth::OAuth2 {
        token_url: erp.token_url(),
        client_id: "gw01".into(),
        client_secret: "s3cret".into(),
        scope: None,
    };
    let mut sink = HttpsSink::new(cfg).expect("sink");
    assert!(drive::until(&journal, SINK, &mut sink, Duration::from_secs(30), drained).await);
    let posted: HashSet<String> = erp.posted().into_iter().map(|(id, _)| id).collect();
    assert_eq!(posted, ids.into_iter().collect::<HashSet<_>>());
}
