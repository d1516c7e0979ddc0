//! Simulated ERP APIs that answer the way the real ones do, over real
//! HTTPS: SAP S/4HANA production order confirmation (OData V2, single and
//! `$batch`, CSRF token, `$filter` lookups), Odoo (JSON-RPC `execute_kw`,
//! JSON-2), Oracle Fusion operation transactions (per-record
//! `InterfaceStatusCode`) and Dynamics 365 MES messages (queued, processed
//! later, status asked by id).
//!
//! Like the real APIs none of them deduplicates: a confirmation posted twice
//! is booked twice, which is what the tests look for.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

/// One booking in the ERP's ledger.
#[derive(Clone, Debug, PartialEq)]
pub struct Booking {
    /// Which API booked it (`sap`, `odoo`, `oracle`, `d365`).
    pub api: &'static str,
    /// The event id the body carried (the dedup key in the body).
    pub key: String,
    /// Work order.
    pub order: String,
    /// Quantity booked.
    pub quantity: f64,
}

/// A D365 message and where its processing stands.
#[derive(Clone, Debug)]
struct Message {
    key: String,
    order: String,
    quantity: f64,
    state: &'static str,
    error: Option<String>,
}

/// What the ERPs hold and how they misbehave.
#[derive(Default)]
pub struct ApiState {
    /// Every booking, in order (duplicates included).
    pub booked: Mutex<Vec<Booking>>,
    /// Work orders that are closed: confirmations are refused.
    pub closed_orders: Mutex<HashSet<String>>,
    /// The next this many confirmations are committed, then the connection
    /// breaks before the answer is complete (a reset after commit).
    pub reset_after_commit: Mutex<u32>,
    /// CSRF tokens issued with their session cookie (SAP).
    csrf: Mutex<HashMap<String, String>>,
    /// CSRF token fetches answered.
    pub csrf_fetches: Mutex<u64>,
    /// Lookups answered (SAP `$filter`, D365 status).
    pub lookups: Mutex<u64>,
    /// D365 messages by event id, in arrival order.
    messages: Mutex<Vec<Message>>,
    /// Requests per API path.
    pub requests: Mutex<HashMap<String, u64>>,
    /// SAP single confirmations: (ConfirmationText, RequestID,
    /// RepeatabilityCreation) headers as received.
    pub sap_repeatability: Mutex<Vec<(String, String, String)>>,
    /// Asynchronous API: (reference, Repeatability-Request-ID,
    /// Repeatability-First-Sent) as received.
    pub oasis_repeatability: Mutex<Vec<(String, String, String)>>,
    /// Asynchronous API operations: reference, state, message.
    operations: Mutex<Vec<(String, &'static str, Option<String>)>>,
}

impl ApiState {
    /// Bookings whose key appears more than once.
    pub fn double_bookings(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        self.booked
            .lock()
            .expect("state")
            .iter()
            .filter(|b| !seen.insert(b.key.clone()))
            .map(|b| b.key.clone())
            .collect()
    }

    /// Keys booked, in order.
    pub fn booked_keys(&self) -> Vec<String> {
        self.booked
            .lock()
            .expect("state")
            .iter()
            .map(|b| b.key.clone())
            .collect()
    }

    /// Invalidates every CSRF token (a session timeout).
    pub fn expire_csrf_tokens(&self) {
        self.csrf.lock().expect("state").clear();
    }

    /// D365's batch job: processes every queued message (books it, or
    /// fails it when its order is closed). Returns how many it processed.
    pub fn process_d365_queue(&self) -> usize {
        let closed = self.closed_orders.lock().expect("state").clone();
        let mut messages = self.messages.lock().expect("state");
        let mut n = 0;
        for m in messages.iter_mut().filter(|m| m.state == "Queued") {
            n += 1;
            if closed.contains(&m.order) {
                m.state = "Failed";
                m.error = Some(format!(
                    "Production order {} has status Ended; report as finished is not possible",
                    m.order
                ));
            } else {
                m.state = "Processed";
                self.booked.lock().expect("state").push(Booking {
                    api: "d365",
                    key: m.key.clone(),
                    order: m.order.clone(),
                    quantity: m.quantity,
                });
            }
        }
        n
    }

    /// D365 messages still queued.
    pub fn d365_queued(&self) -> usize {
        self.messages
            .lock()
            .expect("state")
            .iter()
            .filter(|m| m.state == "Queued")
            .count()
    }

    fn count(&self, path: &str) {
        *self
            .requests
            .lock()
            .expect("state")
            .entry(path.to_owned())
            .or_default() += 1;
    }

    /// Books unless the order is closed or the quantity is not positive;
    /// `Err` carries the ERP's message.
    fn book(&self, api: &'static str, key: &str, order: &str, quantity: f64) -> Result<(), String> {
        if key.is_empty() {
            return Err("the confirmation carries no reference".into());
        }
        if self.closed_orders.lock().expect("state").contains(order) {
            return Err(format!(
                "Order {order} is already closed; confirmation not possible"
            ));
        }
        if quantity.is_nan() || quantity <= 0.0 {
            return Err(format!("Quantity {quantity} must be greater than zero"));
        }
        self.booked.lock().expect("state").push(Booking {
            api,
            key: key.to_owned(),
            order: order.to_owned(),
            quantity,
        });
        Ok(())
    }

    /// Whether this committed answer must break (reset after commit).
    fn break_now(&self) -> bool {
        let mut left = self.reset_after_commit.lock().expect("state");
        if *left > 0 {
            *left -= 1;
            true
        } else {
            false
        }
    }
}

/// A response whose body breaks off after the status line: the client
/// sees a 2xx and a reset, and cannot know what the ERP committed.
fn broken(status: StatusCode) -> Response {
    let chunks = futures_util::stream::iter(vec![
        Ok(Bytes::from_static(b"{\"d\":")),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset after commit",
        )),
    ]);
    (
        status,
        [("content-type", "application/json")],
        axum::body::Body::from_stream(chunks),
    )
        .into_response()
}

fn quantity(value: &Value) -> f64 {
    match value {
        Value::String(s) => s.trim().parse().unwrap_or(f64::NAN),
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        _ => f64::NAN,
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Percent-decodes a query component (`+` is a space).
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The quoted value in an OData `$filter=<field> eq '<value>'`.
fn filter_value(uri: &Uri, field: &str) -> Option<String> {
    let query = uri.query()?;
    let filter = query.split('&').find_map(|p| {
        p.strip_prefix("$filter=")
            .or_else(|| p.strip_prefix("%24filter="))
    })?;
    let filter = decode(filter);
    let rest = filter
        .trim()
        .strip_prefix(field)?
        .trim()
        .strip_prefix("eq")?
        .trim();
    Some(rest.trim_matches('\'').to_owned())
}

fn sap_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        [("content-type", "application/json")],
        json!({"error": {"code": "CO/016", "message": {"lang": "en", "value": message}}})
            .to_string(),
    )
        .into_response()
}

/// SAP: is the request's CSRF token one we issued for its session cookie?
fn csrf_ok(state: &ApiState, headers: &HeaderMap) -> bool {
    let token = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let cookie = headers
        .get("cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    state
        .csrf
        .lock()
        .expect("state")
        .get(token)
        .is_some_and(|session| cookie.contains(session.as_str()))
}

fn csrf_required() -> Response {
    (
        StatusCode::FORBIDDEN,
        [("x-csrf-token", "Required")],
        "CSRF token validation failed",
    )
        .into_response()
}

/// One `ProdnOrdConf2` confirmation; `Err` is the SAP message.
fn sap_confirm(state: &ApiState, body: &Value) -> Result<Value, String> {
    let key = text(&body["ConfirmationText"]);
    if key.len() > 40 {
        return Err(format!(
            "ConfirmationText is longer than 40 characters: {key}"
        ));
    }
    if !text(&body["PostingDate"]).starts_with("/Date(") {
        return Err("PostingDate is not an Edm.DateTime".into());
    }
    let order = text(&body["OrderID"]);
    let yield_or_scrap = match body.get("ConfirmationYieldQuantity") {
        Some(q) => quantity(q),
        None => quantity(&body["ConfirmationScrapQuantity"]),
    };
    state.book("sap", &key, &order, yield_or_scrap)?;
    Ok(
        json!({"d": {"OrderID": order, "ConfirmationText": key, "ConfirmationGroup": "1", "ConfirmationCount": "1"}}),
    )
}

async fn sap_root(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    state.count("sap-root");
    let fetch = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("fetch"));
    if !fetch {
        return (
            StatusCode::OK,
            "{\"d\":{\"EntitySets\":[\"ProdnOrdConf2\"]}}",
        )
            .into_response();
    }
    *state.csrf_fetches.lock().expect("state") += 1;
    let n = state.csrf.lock().expect("state").len() + 1;
    let token = format!("csrf-{n}-{}", fastish());
    let session = format!("SAP_SESSIONID_S4H_100=s{n}{}", fastish());
    state
        .csrf
        .lock()
        .expect("state")
        .insert(token.clone(), session.clone());
    (
        StatusCode::OK,
        [
            ("x-csrf-token", token),
            ("set-cookie", format!("{session}; path=/; secure; HttpOnly")),
        ],
        "{\"d\":{}}",
    )
        .into_response()
}

fn fastish() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000)
        .unwrap_or(0)
}

async fn sap_confirmations_post(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.count("sap");
    if !csrf_ok(&state, &headers) {
        return csrf_required();
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return sap_error(
            StatusCode::BAD_REQUEST,
            "The request body is not valid JSON",
        );
    };
    match sap_confirm(&state, &body) {
        Ok(_) if state.break_now() => broken(StatusCode::CREATED),
        Ok(created) => (
            StatusCode::CREATED,
            [("content-type", "application/json")],
            created.to_string(),
        )
            .into_response(),
        Err(message) => sap_error(StatusCode::BAD_REQUEST, &message),
    }
}

async fn sap_confirmations_get(State(state): State<Arc<ApiState>>, uri: Uri) -> Response {
    state.count("sap-lookup");
    *state.lookups.lock().expect("state") += 1;
    let Some(key) = filter_value(&uri, "ConfirmationText") else {
        return sap_error(
            StatusCode::BAD_REQUEST,
            "a $filter on ConfirmationText is required",
        );
    };
    let results: Vec<Value> = state
        .booked
        .lock()
        .expect("state")
        .iter()
        .filter(|b| b.api == "sap" && b.key == key)
        .map(|b| json!({"OrderID": b.order, "ConfirmationText": b.key}))
        .collect();
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        json!({"d": {"results": results}}).to_string(),
    )
        .into_response()
}

/// SAP `$batch`: each changeset is its own commit; the answer (202) has a
/// nested multipart per committed changeset and one error part per failed.
async fn sap_batch(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.count("sap-batch");
    if !csrf_ok(&state, &headers) {
        return csrf_required();
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(boundary) = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .map(str::to_owned)
    else {
        return sap_error(StatusCode::BAD_REQUEST, "multipart boundary missing");
    };
    let text = String::from_utf8_lossy(&body).into_owned();
    let mut out = String::new();
    let reply = "batchresponse_1";
    for (i, part) in text
        .split(&format!("--{boundary}"))
        .skip(1)
        .take_while(|p| !p.starts_with("--"))
        .enumerate()
    {
        // The changeset's JSON body: from its first '{' to its last '}'.
        let json_body = match (part.find('{'), part.rfind('}')) {
            (Some(a), Some(b)) if b > a => &part[a..=b],
            _ => "",
        };
        let result = serde_json::from_str::<Value>(json_body)
            .map_err(|_| "The changeset body is not valid JSON".to_owned())
            .and_then(|v| sap_confirm(&state, &v));
        match result {
            Ok(created) => {
                let cs = format!("changesetresponse_{i}");
                let created = created.to_string();
                out.push_str(&format!(
                    "--{reply}\r\nContent-Type: multipart/mixed; boundary={cs}\r\n\r\n--{cs}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nHTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{created}\r\n--{cs}--\r\n",
                    created.len()
                ));
            }
            Err(message) => {
                let error = json!({"error": {"code": "CO/016", "message": {"lang": "en", "value": message}}}).to_string();
                out.push_str(&format!(
                    "--{reply}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nHTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{error}\r\n",
                    error.len()
                ));
            }
        }
    }
    out.push_str(&format!("--{reply}--\r\n"));
    if state.break_now() {
        return broken(StatusCode::ACCEPTED);
    }
    (
        StatusCode::ACCEPTED,
        [("content-type", format!("multipart/mixed; boundary={reply}"))],
        out,
    )
        .into_response()
}

/// Odoo JSON-RPC: HTTP 200 whatever happens; a refusal is `{"error": …}`.
async fn odoo_jsonrpc(State(state): State<Arc<ApiState>>, body: Bytes) -> Response {
    state.count("odoo-jsonrpc");
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let id = request["id"].clone();
    let args = &request["params"]["args"];
    if args[3] == "x_production_report" && args[4] == "search_read" {
        *state.lookups.lock().expect("state") += 1;
        let found = odoo_search(&state, &args[5]);
        return (
            [("content-type", "application/json")],
            json!({"jsonrpc": "2.0", "id": id, "result": found}).to_string(),
        )
            .into_response();
    }
    let answer = if args[3] != "x_production_report" || args[4] != "create" {
        Err(format!("Object {} doesn't exist", args[3]))
    } else {
        let vals = &args[5][0];
        state.book(
            "odoo",
            &text(&vals["x_event_id"]),
            &text(&vals["x_production_name"]),
            quantity(&vals["x_qty_produced"]),
        )
    };
    let body = match answer {
        Ok(()) if state.break_now() => return broken(StatusCode::OK),
        Ok(()) => json!({"jsonrpc": "2.0", "id": id, "result": 42}),
        Err(message) => {
            json!({"jsonrpc": "2.0", "id": id, "error": {"code": 200, "message": "Odoo Server Error", "data": {"name": "odoo.exceptions.ValidationError", "message": message}}})
        }
    };
    ([("content-type", "application/json")], body.to_string()).into_response()
}

/// Odoo records whose `x_event_id` equals the value in a domain
/// `[["x_event_id", "=", value]]`.
fn odoo_search(state: &ApiState, domain: &Value) -> Vec<Value> {
    let Some(wanted) = domain.as_array().and_then(|d| {
        d.iter()
            .find(|c| c[0] == "x_event_id" && c[1] == "=")
            .map(|c| text(&c[2]))
    }) else {
        return Vec::new();
    };
    state
        .booked
        .lock()
        .expect("state")
        .iter()
        .filter(|b| b.api == "odoo" && b.key == wanted)
        .map(|b| json!({"id": 42, "x_event_id": b.key}))
        .collect()
}

/// Odoo JSON-2 `search_read`.
async fn odoo_json2_search(State(state): State<Arc<ApiState>>, body: Bytes) -> Response {
    state.count("odoo-json2-search");
    *state.lookups.lock().expect("state") += 1;
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let found = odoo_search(&state, &request["domain"]);
    (
        [("content-type", "application/json")],
        Value::from(found).to_string(),
    )
        .into_response()
}

/// Oracle: `GET operationTransactions?q=SourceLineReference='<id>'`, the
/// records it booked.
async fn oracle_query(State(state): State<Arc<ApiState>>, uri: Uri) -> Response {
    state.count("oracle-query");
    *state.lookups.lock().expect("state") += 1;
    let wanted = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|p| p.strip_prefix("q="))
        .map(decode)
        .and_then(|q| {
            q.strip_prefix("SourceLineReference=")
                .map(|v| v.trim_matches('\'').to_owned())
        })
        .unwrap_or_default();
    let items: Vec<Value> = state
        .booked
        .lock()
        .expect("state")
        .iter()
        .filter(|b| b.api == "oracle" && b.key == wanted)
        .map(|b| json!({"SourceLineReference": b.key, "WorkOrderNumber": b.order, "InterfaceStatusCode": "SUCCESS"}))
        .collect();
    (
        [("content-type", "application/json")],
        json!({"items": items, "count": items.len()}).to_string(),
    )
        .into_response()
}

/// Odoo JSON-2 (`/json/2/<model>/<method>`): errors are HTTP statuses with
/// a JSON body.
async fn odoo_json2(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.count("odoo-json2");
    if !headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("bearer "))
    {
        return (
            StatusCode::UNAUTHORIZED,
            "{\"name\":\"werkzeug.exceptions.Unauthorized\",\"message\":\"API key required\"}",
        )
            .into_response();
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let vals = &request["vals_list"][0];
    match state.book(
        "odoo",
        &text(&vals["x_event_id"]),
        &text(&vals["x_production_name"]),
        quantity(&vals["x_qty_produced"]),
    ) {
        Ok(()) if state.break_now() => broken(StatusCode::OK),
        Ok(()) => ([("content-type", "application/json")], "[42]").into_response(),
        Err(message) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            [("content-type", "application/json")],
            json!({"name": "odoo.exceptions.ValidationError", "message": message, "arguments": [message]}).to_string(),
        )
            .into_response(),
    }
}

/// Oracle Fusion `operationTransactions`: 201 with a status per record.
async fn oracle(State(state): State<Arc<ApiState>>, body: Bytes) -> Response {
    state.count("oracle");
    let mut request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(details) = request["OperationTransactionDetail"].as_array_mut() else {
        return (
            StatusCode::BAD_REQUEST,
            "OperationTransactionDetail is required",
        )
            .into_response();
    };
    for d in details.iter_mut() {
        let result = state.book(
            "oracle",
            &text(&d["SourceLineReference"]),
            &text(&d["WorkOrderNumber"]),
            quantity(&d["TransactionQuantity"]),
        );
        match result {
            Ok(()) => d["InterfaceStatusCode"] = json!("SUCCESS"),
            Err(message) => {
                d["InterfaceStatusCode"] = json!("ERROR");
                d["ErrorMessage"] = json!(message);
            }
        }
    }
    if state.break_now() {
        return broken(StatusCode::CREATED);
    }
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        request.to_string(),
    )
        .into_response()
}

/// D365 `SysMessageService/SendMessage`: 200 when queued; the message is
/// processed later by a batch job and can fail then.
async fn d365_send(State(state): State<Arc<ApiState>>, body: Bytes) -> Response {
    state.count("d365");
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if request["_messageType"] != "ProdProductionOrderReportFinished" {
        return (
            StatusCode::BAD_REQUEST,
            "{\"Message\":\"Unknown message type\"}",
        )
            .into_response();
    }
    let Some(content) = request["_messageContent"]
        .as_str()
        .and_then(|c| serde_json::from_str::<Value>(c).ok())
    else {
        return (
            StatusCode::BAD_REQUEST,
            "{\"Message\":\"_messageContent is not a JSON string\"}",
        )
            .into_response();
    };
    state.messages.lock().expect("state").push(Message {
        key: text(&content["PlantEdgeEventId"]),
        order: text(&content["ProductionOrderNumber"]),
        quantity: quantity(&content["ReportedGoodQuantity"]),
        state: "Queued",
        error: None,
    });
    if state.break_now() {
        return broken(StatusCode::OK);
    }
    ([("content-type", "application/json")], "true").into_response()
}

/// D365 message status by the event id the message carried.
async fn d365_status(State(state): State<Arc<ApiState>>, uri: Uri) -> Response {
    state.count("d365-status");
    *state.lookups.lock().expect("state") += 1;
    let key = filter_value(&uri, "PlantEdgeEventId").unwrap_or_default();
    let value: Vec<Value> = state
        .messages
        .lock()
        .expect("state")
        .iter()
        .filter(|m| m.key == key)
        .map(|m| json!({"PlantEdgeEventId": m.key, "MessageState": m.state, "ErrorMessage": m.error}))
        .collect();
    (
        [("content-type", "application/json")],
        json!({"value": value}).to_string(),
    )
        .into_response()
}

/// Client-credentials tokens (any client is welcome here).
async fn token() -> Response {
    (
        [("content-type", "application/json")],
        "{\"access_token\":\"sim-token\",\"token_type\":\"Bearer\",\"expires_in\":3600}",
    )
        .into_response()
}

/// An asynchronous API in the Azure style: `202 Accepted` with an
/// `Operation-Location`; the operation runs until `finish_operations`.
async fn async_post(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.count("async");
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let reference = text(&request["reference"]);
    state.oasis_repeatability.lock().expect("state").push((
        reference.clone(),
        header("repeatability-request-id"),
        header("repeatability-first-sent"),
    ));
    let mut operations = state.operations.lock().expect("state");
    operations.push((reference, "Running", None));
    let n = operations.len();
    (
        StatusCode::ACCEPTED,
        [("operation-location", format!("/async/operations/{n}"))],
        "",
    )
        .into_response()
}

async fn async_operation(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(n): axum::extract::Path<usize>,
) -> Response {
    state.count("async-status");
    let operations = state.operations.lock().expect("state");
    match operations.get(n.wrapping_sub(1)) {
        Some((_, status, message)) => (
            [("content-type", "application/json")],
            json!({"status": status, "error": {"message": message}}).to_string(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

impl ApiState {
    /// Ends every running asynchronous operation: booked, or failed when
    /// its order is closed.
    pub fn finish_operations(&self) {
        let closed = self.closed_orders.lock().expect("state").clone();
        for (reference, status, message) in self.operations.lock().expect("state").iter_mut() {
            if *status != "Running" {
                continue;
            }
            let order = reference.split(':').next().unwrap_or("").to_owned();
            if closed.contains(&order) {
                *status = "Failed";
                *message = Some(format!("Order {order} is closed"));
            } else {
                *status = "Succeeded";
                self.booked.lock().expect("state").push(Booking {
                    api: "async",
                    key: reference.split(':').nth(1).unwrap_or("").to_owned(),
                    order,
                    quantity: 1.0,
                });
            }
        }
    }
}

/// A running set of simulated ERP APIs.
pub struct ErpApis {
    /// Shared state.
    pub state: Arc<ApiState>,
    /// Where it listens.
    pub addr: SocketAddr,
    handle: axum_server::Handle<SocketAddr>,
}

/// Paths of the simulated APIs.
pub mod paths {
    /// SAP service root.
    pub const SAP_SERVICE: &str = "/sap/opu/odata/sap/API_PROD_ORDER_CONFIRMATION_2_SRV";
    /// Odoo JSON-RPC.
    pub const ODOO_JSONRPC: &str = "/jsonrpc";
    /// Oracle Fusion operation transactions.
    pub const ORACLE: &str = "/fscmRestApi/resources/11.13.18.05/operationTransactions";
    /// OAuth2 client-credentials token endpoint (Entra ID's role).
    pub const TOKEN: &str = "/oauth2/v2.0/token";
    /// An asynchronous API (202 + Operation-Location).
    pub const ASYNC: &str = "/async/confirmations";
    /// D365 SendMessage.
    pub const D365_SEND: &str = "/api/services/SysMessageServices/SysMessageService/SendMessage";
}

impl ErpApis {
    /// Starts on a free loopback port with the given server certificate.
    pub async fn start(cert: &std::path::Path, key: &std::path::Path) -> ErpApis {
        let tls = crate::erp::tls_config(cert, key);
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        let state = Arc::new(ApiState::default());
        let sap = paths::SAP_SERVICE;
        let app = Router::new()
            .route(&format!("{sap}/"), get(sap_root))
            .route(
                &format!("{sap}/ProdnOrdConf2"),
                post(sap_confirmations_post).get(sap_confirmations_get),
            )
            .route(&format!("{sap}/$batch"), post(sap_batch))
            .route(paths::ODOO_JSONRPC, post(odoo_jsonrpc))
            .route("/json/2/x_production_report/create", post(odoo_json2))
            .route(paths::ORACLE, post(oracle).get(oracle_query))
            .route(
                "/json/2/x_production_report/search_read",
                post(odoo_json2_search),
            )
            .route(paths::D365_SEND, post(d365_send))
            .route("/data/SysMessageProcessorMessages", get(d365_status))
            .route(paths::TOKEN, post(token))
            .route(paths::ASYNC, post(async_post))
            .route("/async/operations/{n}", get(async_operation))
            .with_state(state.clone());
        let handle = axum_server::Handle::new();
        let server = axum_server::bind_rustls(addr, tls).handle(handle.clone());
        tokio::spawn(async move {
            let _ = server.serve(app.into_make_service()).await;
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "ERP APIs did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        ErpApis {
            state,
            addr,
            handle,
        }
    }

    /// `https://localhost:<port>` (the certificate's name).
    pub fn base(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// Processes D365's queue every `every` until the runtime ends (the
    /// batch job of a real system).
    pub fn run_d365_batch_job(&self, every: Duration) {
        let state = self.state.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                state.process_d365_queue();
            }
        });
    }
}

impl Drop for ErpApis {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_read_from_encoded_queries() {
        let uri: Uri = "/x?$filter=ConfirmationText%20eq%20'6f1c2b7e-58a4'&$format=json"
            .parse()
            .expect("uri");
        assert_eq!(
            filter_value(&uri, "ConfirmationText").as_deref(),
            Some("6f1c2b7e-58a4")
        );
    }
}
