//! The shipped ERP examples (`packaging/examples/*.toml`), each against a
//! simulated ERP that answers like the real API, over real TLS: refusals
//! are dead letters under the ERP's own message, nothing refused is counted
//! delivered, a reset after the ERP committed is looked up instead of
//! booked twice, and a queued D365 message is accepted-pending until the
//! ERP processes it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use buffer::{AppendRequest, EventClass, Journal, JournalConfig, NewEvent};
use plant_edge_tests::drive;
use plant_edge_tests::erp_apis::ErpApis;
use plant_edge_tests::erp_events::{completion, journal_of};
use plant_edge_tests::pki::{self, Pki};
use protocols::sinks::https::erp::{ErpProfile, ProfileConfig};
use protocols::sinks::https::{HttpsAuth, HttpsMode, HttpsSink, HttpsSinkConfig};
use protocols::tls::TlsSettings;
use protocols::{Sink, Verdict};

fn example(name: &str) -> (String, toml::Table) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/examples")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("example");
    let table: toml::Table = toml::from_str(&text).expect("example parses");
    let sinks = table["sinks"].as_table().expect("sinks");
    let (sink_name, sink) = sinks.iter().next().expect("one sink");
    (sink_name.clone(), sink.as_table().expect("sink").clone())
}

/// The example's sink, pointed at the simulator (same path, its host).
fn sink_from_example(name: &str, apis: &ErpApis, pki: &Pki) -> HttpsSink {
    let (_, table) = example(name);
    let url = table["url"].as_str().expect("url");
    let path_start = url["https://".len()..].find('/').expect("path") + "https://".len();
    let url = format!("{}{}", apis.base(), &url[path_start..]);
    let mode = match table.get("mode").and_then(|m| m.as_str()) {
        Some("single") => HttpsMode::Single,
        _ => HttpsMode::Batch {
            max_events: table
                .get("batch_events")
                .and_then(|n| n.as_integer())
                .unwrap_or(500) as usize,
            max_bytes: 1 << 20,
        },
    };
    let profile: ProfileConfig = toml::Value::Table(table.clone())
        .try_into()
        .expect("profile tables");
    let batched = matches!(mode, HttpsMode::Batch { .. });
    let profile = profile.check(Path::new("."), batched).expect("checks");
    profile
        .check_rendering(batched)
        .expect("renders the sample");
    let auth = if table.contains_key("bearer_token_file") {
        // JSON-2 wants an API key as a bearer token: the header the
        // simulator checks.
        let file = pki.ca.with_file_name("odoo-api-key");
        std::fs::write(&file, "key-1").expect("key");
        HttpsAuth::BearerFile(file)
    } else if let Some(user) = table.get("username").and_then(|u| u.as_str()) {
        HttpsAuth::Basic {
            user: user.into(),
            password: "secret".into(),
        }
    } else {
        HttpsAuth::None
    };
    sink_to(url, mode, auth, pki, profile)
}

/// A sink to `url` trusting the test CA.
fn sink_to(
    url: String,
    mode: HttpsMode,
    auth: HttpsAuth,
    pki: &Pki,
    profile: ErpProfile,
) -> HttpsSink {
    HttpsSink::new(HttpsSinkConfig {
        url,
        mode,
        headers: Vec::new(),
        gzip: false,
        auth,
        tls: TlsSettings {
            ca_file: Some(pki.ca.clone()),
            client_cert: None,
            client_key: None,
            alpn: Vec::new(),
        },
        insecure_skip_verify: false,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        max_events_per_second: None,
        profile,
    })
    .expect("sink")
}

/// Events: `orders[i]` is event i's work order; quantities 1, 2, 3, …
fn journal_with(dir: &Path, orders: &[&str]) -> (Journal, Vec<String>) {
    let events = orders
        .iter()
        .enumerate()
        .map(|(i, order)| completion(uuid::Uuid::new_v4(), order, 1000 + i as u64, i as u64 + 1))
        .collect();
    journal_of(dir, "erp", events)
}

fn settled(journal: &Journal) -> bool {
    journal.backlog("erp").expect("backlog") == 0
}

fn dead_letters(journal: &Journal) -> BTreeMap<String, String> {
    journal
        .dead_letters()
        .expect("dead letters")
        .into_iter()
        .map(|d| (d.id.to_string(), d.reason))
        .collect()
}

async fn setup() -> (tempfile::TempDir, Pki, ErpApis) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki::generate(dir.path(), "erp");
    let apis = ErpApis::start(&pki.server_cert, &pki.server_key).await;
    (dir, pki, apis)
}

/// Every example: refused orders dead-lettered with the ERP's message, the
/// rest booked once each, nothing refused counted delivered.
async fn refusals_are_dead_letters_with_the_erps_message(example_file: &str) {
    let (dir, pki, apis) = setup().await;
    apis.state
        .closed_orders
        .lock()
        .expect("state")
        .insert("1000999".into());
    let orders: Vec<&str> = (0..12)
        .map(|i| if i % 4 == 1 { "1000999" } else { "1000123" })
        .collect();
    let (journal, ids) = journal_with(dir.path(), &orders);
    let mut sink = sink_from_example(example_file, &apis, &pki);
    if example_file.starts_with("dynamics365") {
        apis.run_d365_batch_job(Duration::from_millis(200));
    }
    assert!(
        drive::until(&journal, "erp", &mut sink, Duration::from_secs(60), settled).await,
        "{example_file}: backlog left: {}",
        journal.backlog("erp").expect("backlog")
    );
    let refused: Vec<&String> = ids
        .iter()
        .zip(&orders)
        .filter(|(_, o)| **o == "1000999")
        .map(|(id, _)| id)
        .collect();
    let letters = dead_letters(&journal);
    assert_eq!(letters.len(), refused.len(), "{example_file}: {letters:?}");
    for id in &refused {
        let reason = &letters[*id];
        assert!(
            reason.contains("1000999") && reason.contains("closed") || reason.contains("Ended"),
            "{example_file}: the ERP's own message is the reason: {reason}"
        );
    }
    let booked = apis.state.booked_keys();
    let expected: Vec<String> = ids
        .iter()
        .filter(|id| !refused.contains(id))
        .cloned()
        .collect();
    assert_eq!(
        booked, expected,
        "{example_file}: booked once each, in order"
    );
    assert!(apis.state.double_bookings().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sap_single_confirmations_refused_by_sap_are_dead_letters_with_sap_message() {
    refusals_are_dead_letters_with_the_erps_message("sap-s4hana-confirmation.toml").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sap_batch_changesets_refused_by_sap_are_dead_letters_with_sap_message() {
    refusals_are_dead_letters_with_the_erps_message("sap-s4hana-batch.toml").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odoo_jsonrpc_errors_inside_http_200_are_dead_letters_not_deliveries() {
    refusals_are_dead_letters_with_the_erps_message("odoo-jsonrpc.toml").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odoo_json2_refusals_are_dead_letters_with_odoo_message() {
    refusals_are_dead_letters_with_the_erps_message("odoo-json2.toml").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oracle_records_with_interface_status_error_are_dead_letters_inside_a_201() {
    refusals_are_dead_letters_with_the_erps_message("oracle-fusion-operation-transactions.toml")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d365_messages_failing_after_they_were_queued_are_dead_letters() {
    refusals_are_dead_letters_with_the_erps_message("dynamics365-report-finished.toml").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sap_batch_of_50_with_3_failing_changesets_delivers_47_and_dead_letters_3() {
    let (dir, pki, apis) = setup().await;
    apis.state
        .closed_orders
        .lock()
        .expect("state")
        .insert("1000999".into());
    let orders: Vec<&str> = (0..50)
        .map(|i| {
            if [7, 23, 41].contains(&i) {
                "1000999"
            } else {
                "1000123"
            }
        })
        .collect();
    let (journal, ids) = journal_with(dir.path(), &orders);
    let mut sink = sink_from_example("sap-s4hana-batch.toml", &apis, &pki);
    let batch = journal.read_batch("erp", 50).expect("read");
    assert_eq!(batch.len(), 50);
    let verdicts = sink.deliver(&batch).await;
    let delivered = verdicts
        .iter()
        .filter(|v| **v == Verdict::Delivered)
        .count();
    let refused: Vec<usize> = verdicts
        .iter()
        .enumerate()
        .filter(|(_, v)| matches!(v, Verdict::Rejected { .. }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(delivered, 47);
    assert_eq!(refused, vec![7, 23, 41]);
    if let Verdict::Rejected { reason } = &verdicts[7] {
        assert!(
            reason.contains("Order 1000999 is already closed"),
            "{reason}"
        );
    }
    assert_eq!(
        apis.state.requests.lock().expect("state")["sap-batch"],
        1,
        "one $batch request"
    );
    assert_eq!(apis.state.booked_keys().len(), 47);
    assert!(!apis.state.booked_keys().contains(&ids[7]));
}

/// The ERP commits, then the connection breaks before its answer is in:
/// the lookup finds the booking and the event is not posted again.
async fn a_reset_after_commit_is_looked_up_not_booked_twice(example_file: &str) {
    let (dir, pki, apis) = setup().await;
    let orders = vec!["1000123"; 6];
    let (journal, ids) = journal_with(dir.path(), &orders);
    let mut sink = sink_from_example(example_file, &apis, &pki);
    if example_file.starts_with("dynamics365") {
        apis.run_d365_batch_job(Duration::from_millis(200));
    }
    *apis.state.reset_after_commit.lock().expect("state") = 2;
    assert!(
        drive::until(&journal, "erp", &mut sink, Duration::from_secs(60), settled).await,
        "{example_file}: backlog left"
    );
    assert!(
        apis.state.double_bookings().is_empty(),
        "{example_file}: booked twice: {:?}",
        apis.state.double_bookings()
    );
    assert_eq!(
        apis.state.booked_keys(),
        ids,
        "{example_file}: every event once, in order"
    );
    assert!(
        *apis.state.lookups.lock().expect("state") >= 2,
        "{example_file}: the ERP was asked"
    );
    assert!(dead_letters(&journal).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sap_single_reset_after_commit_is_found_by_the_lookup_and_not_booked_twice() {
    a_reset_after_commit_is_looked_up_not_booked_twice("sap-s4hana-confirmation.toml").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sap_batch_reset_after_commit_is_found_by_the_lookup_and_not_booked_twice() {
    a_reset_after_commit_is_looked_up_not_booked_twice("sap-s4hana-batch.toml").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odoo_jsonrpc_reset_after_create_is_found_by_search_read_and_not_created_twice() {
    a_reset_after_commit_is_looked_up_not_booked_twice("odoo-jsonrpc.toml").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odoo_json2_reset_after_create_is_found_by_search_read_and_not_created_twice() {
    a_reset_after_commit_is_looked_up_not_booked_twice("odoo-json2.toml").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oracle_reset_after_commit_is_found_by_source_line_reference_and_not_booked_twice() {
    a_reset_after_commit_is_looked_up_not_booked_twice("oracle-fusion-operation-transactions.toml")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d365_reset_after_queueing_is_found_by_the_lookup_and_not_queued_twice() {
    a_reset_after_commit_is_looked_up_not_booked_twice("dynamics365-report-finished.toml").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_started_after_a_crash_asks_before_posting_its_first_batch_again() {
    let (dir, pki, apis) = setup().await;
    let (journal, ids) = journal_with(dir.path(), &["1000123"; 3]);
    // The previous process posted the first event and died before its answer.
    let mut first = sink_from_example("sap-s4hana-confirmation.toml", &apis, &pki);
    *apis.state.reset_after_commit.lock().expect("state") = 1;
    let batch = journal.read_batch("erp", 1).expect("read");
    let verdicts = first.deliver(&batch).await;
    assert!(matches!(verdicts[0], Verdict::Retry { .. }), "{verdicts:?}");
    drop(first);
    journal.rewind("erp").expect("rewind");
    let mut restarted = sink_from_example("sap-s4hana-confirmation.toml", &apis, &pki);
    assert!(
        drive::until(
            &journal,
            "erp",
            &mut restarted,
            Duration::from_secs(30),
            settled
        )
        .await
    );
    assert_eq!(apis.state.booked_keys(), ids);
    assert!(apis.state.double_bookings().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_d365_message_is_accepted_pending_until_processed_then_delivered() {
    let (dir, pki, apis) = setup().await;
    let (journal, ids) = journal_with(dir.path(), &["1000123"; 2]);
    let mut sink = sink_from_example("dynamics365-report-finished.toml", &apis, &pki);
    let batch = journal.read_batch("erp", 10).expect("read");
    let verdicts = sink.deliver(&batch).await;
    assert!(
        verdicts
            .iter()
            .all(|v| matches!(v, Verdict::Pending { reason, .. } if reason.contains("not booked"))),
        "{verdicts:?}"
    );
    assert_eq!(apis.state.d365_queued(), 2);
    assert!(apis.state.booked_keys().is_empty());
    // Handed out again: still pending (not due, or the queue has not run).
    journal.rewind("erp").expect("rewind");
    let again = sink
        .deliver(&journal.read_batch("erp", 10).expect("read"))
        .await;
    assert!(again.iter().all(|v| matches!(v, Verdict::Pending { .. })));
    assert_eq!(
        apis.state.requests.lock().expect("state")["d365"],
        2,
        "not posted again while pending"
    );
    apis.state.process_d365_queue();
    journal.rewind("erp").expect("rewind");
    assert!(drive::until(&journal, "erp", &mut sink, Duration::from_secs(30), settled).await);
    assert_eq!(apis.state.booked_keys(), ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_sap_csrf_token_is_fetched_again_and_the_post_repeated_once() {
    let (dir, pki, apis) = setup().await;
    let (journal, ids) = journal_with(dir.path(), &["1000123"; 4]);
    let mut sink = sink_from_example("sap-s4hana-confirmation.toml", &apis, &pki);
    let first = journal.read_batch("erp", 2).expect("read");
    assert!(sink
        .deliver(&first)
        .await
        .iter()
        .all(|v| *v == Verdict::Delivered));
    journal
        .ack("erp", &first.iter().map(|e| e.seq).collect::<Vec<_>>())
        .expect("ack");
    apis.state.expire_csrf_tokens();
    assert!(drive::until(&journal, "erp", &mut sink, Duration::from_secs(30), settled).await);
    assert_eq!(apis.state.booked_keys(), ids);
    assert_eq!(*apis.state.csrf_fetches.lock().expect("state"), 2);
    // repeatability = "sap": the same RequestID for the same event, and
    // when it was first sent.
    for (text, request_id, created) in apis.state.sap_repeatability.lock().expect("state").iter() {
        let id = uuid::Uuid::parse_str(text).expect("event id");
        assert_eq!(*request_id, id.simple().to_string());
        assert!(
            humantime::parse_rfc3339(created).is_ok(),
            "RepeatabilityCreation {created:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_does_not_render_is_a_dead_letter_naming_the_template_and_the_rest_go() {
    let (dir, pki, apis) = setup().await;
    let (journal, ids) = journal_with(dir.path(), &["1000123"; 3]);
    // The second event lacks a work order: strict undefined refuses it.
    let mut config = JournalConfig::new(dir.path().join("journal2"));
    config.sinks = vec!["erp".into()];
    drop(journal);
    let journal = Journal::open(config).expect("journal");
    let routes = journal.routes_all();
    let source = dir.path().join("journal");
    let old = Journal::open({
        let mut c = JournalConfig::new(source);
        c.sinks = vec!["erp".into()];
        c
    })
    .expect("old journal");
    let mut events = old.read_batch("erp", 10).expect("read");
    let mut broken: serde_json::Value = serde_json::from_slice(&events[1].payload).expect("json");
    broken["data"]
        .as_object_mut()
        .expect("data")
        .remove("work_order");
    events[1].payload = serde_json::to_vec(&broken).expect("json");
    journal
        .append_blocking(AppendRequest {
            source: "press1".into(),
            events: events
                .iter()
                .map(|e| NewEvent {
                    id: e.id,
                    class: EventClass::Business,
                    routes,
                    payload: e.payload.clone(),
                    ledger: None,
                })
                .collect(),
            cursor: None,
        })
        .expect("append")
        .expect("fits");
    let mut sink = sink_from_example("oracle-fusion-operation-transactions.toml", &apis, &pki);
    assert!(drive::until(&journal, "erp", &mut sink, Duration::from_secs(30), settled).await);
    let letters = dead_letters(&journal);
    let reason = &letters[&ids[1]];
    assert!(
        reason.contains("request.body") && reason.contains("undefined"),
        "{reason}"
    );
    assert_eq!(
        apis.state.booked_keys(),
        vec![ids[0].clone(), ids[2].clone()]
    );
}

/// Every shipped example's body for the sample event, kept as a golden
/// file: a MiniJinja upgrade that changes the output fails here, not at a
/// plant. `PLANT_EDGE_BLESS=1` rewrites them after a reviewed change.
#[test]
fn every_shipped_example_renders_its_golden_body() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path.file_name().and_then(|n| n.to_str()).expect("name");
        let (_, table) = example(name);
        let batched = table.get("mode").and_then(|m| m.as_str()) != Some("single");
        let profile: ProfileConfig = toml::Value::Table(table).try_into().expect("profile");
        let profile = profile.check(Path::new("."), batched).expect("checks");
        let body = profile.sample_body(batched).expect("renders");
        let golden = dir.join("golden").join(format!("{name}.body"));
        if std::env::var_os("PLANT_EDGE_BLESS").is_some() {
            std::fs::create_dir_all(golden.parent().expect("dir")).expect("mkdir");
            std::fs::write(&golden, &body).expect("write golden");
        }
        let expected = std::fs::read_to_string(&golden).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with PLANT_EDGE_BLESS=1 once)",
                golden.display()
            )
        });
        assert_eq!(
            body,
            expected,
            "{name}: rendered body differs from {}",
            golden.display()
        );
        checked += 1;
    }
    assert_eq!(checked, 6, "every shipped example has a golden body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_202_with_operation_location_is_followed_there_until_it_succeeds_or_fails() {
    let (dir, pki, apis) = setup().await;
    apis.state
        .closed_orders
        .lock()
        .expect("state")
        .insert("1000999".into());
    let (journal, ids) = journal_with(dir.path(), &["1000123", "1000999", "1000123"]);
    let profile: ProfileConfig = toml::from_str(
        r#"
[request]
body = '{"reference": {{ work_order ~ ":" ~ id }}}'
repeatability = "oasis"

[answer]
pending_statuses = [202]

[pending]
url = "{{ location }}"
state = "/status"
booked = ["Succeeded"]
failed = ["Failed"]
message = "/error/message"
poll_every = "50ms"
"#,
    )
    .expect("toml");
    let profile = profile.check(Path::new("."), false).expect("checks");
    profile.check_rendering(false).expect("renders");
    let mut sink = sink_to(
        format!(
            "{}{}",
            apis.base(),
            plant_edge_tests::erp_apis::paths::ASYNC
        ),
        HttpsMode::Single,
        HttpsAuth::None,
        &pki,
        profile,
    );
    let batch = journal.read_batch("erp", 10).expect("read");
    let verdicts = sink.deliver(&batch).await;
    assert!(
        verdicts
            .iter()
            .all(|v| matches!(v, Verdict::Pending { .. })),
        "{verdicts:?}"
    );
    // Still running: handed out again until each status was asked (every
    // poll_every), pending each time, never posted again.
    let asked = |apis: &ErpApis| {
        apis.state
            .requests
            .lock()
            .expect("state")
            .get("async-status")
            .copied()
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while asked(&apis) < 3 {
        assert!(std::time::Instant::now() < deadline, "status never asked");
        journal.rewind("erp").expect("rewind");
        let again = sink
            .deliver(&journal.read_batch("erp", 10).expect("read"))
            .await;
        assert!(
            again.iter().all(|v| matches!(v, Verdict::Pending { .. })),
            "{again:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(apis.state.requests.lock().expect("state")["async"], 3);
    apis.state.finish_operations();
    journal.rewind("erp").expect("rewind");
    assert!(drive::until(&journal, "erp", &mut sink, Duration::from_secs(30), settled).await);
    assert_eq!(
        apis.state.booked_keys(),
        vec![ids[0].clone(), ids[2].clone()]
    );
    let letters = dead_letters(&journal);
    assert!(
        letters[&ids[1]].contains("Order 1000999 is closed"),
        "{letters:?}"
    );
    for (reference, request_id, first_sent) in
        apis.state.oasis_repeatability.lock().expect("state").iter()
    {
        assert!(
            reference.ends_with(request_id.as_str()),
            "Repeatability-Request-ID is the event id"
        );
        assert!(
            httpdate::parse_http_date(first_sent).is_ok(),
            "{first_sent:?}"
        );
    }
}
