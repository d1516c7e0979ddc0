//! OData `$batch` (multipart/mixed, V2 and V4): one changeset per event, and
//! the status of each changeset read back from the multipart answer.
//!
//! A changeset is the ERP's unit of commit: the answer has one part per
//! changeset, in request order: a nested `multipart/mixed` with the
//! changeset's responses when it committed, a single `application/http`
//! error response when it did not.

/// One changeset's request: `POST <path>` with a JSON body.
pub struct Changeset {
    /// Path relative to the service root (`ProdnOrdConf2`).
    pub path: String,
    /// JSON body.
    pub body: String,
}

/// The multipart body and its content type for `changesets`; `key` makes
/// the boundaries (any text without spaces).
pub fn build(key: &str, content_type: &str, changesets: &[Changeset]) -> (String, String) {
    let batch = format!("batch_{key}");
    let mut out = String::new();
    for (i, c) in changesets.iter().enumerate() {
        let changeset = format!("changeset_{key}_{i}");
        out.push_str(&format!(
            "--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n"
        ));
        out.push_str(&format!(
            "--{changeset}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: {}\r\n\r\n",
            i + 1
        ));
        out.push_str(&format!(
            "POST {} HTTP/1.1\r\nContent-Type: {content_type}\r\nAccept: application/json\r\nContent-Length: {}\r\n\r\n{}\r\n",
            c.path,
            c.body.len(),
            c.body
        ));
        out.push_str(&format!("--{changeset}--\r\n"));
    }
    out.push_str(&format!("--{batch}--\r\n"));
    (format!("multipart/mixed; boundary={batch}"), out)
}

/// What one changeset's answer says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartAnswer {
    /// HTTP status of the changeset (its first failing response, else its
    /// first response).
    pub status: u16,
    /// The response body (JSON error details, or the created entity).
    pub body: String,
}

/// The boundary parameter of a multipart content type.
pub fn boundary(content_type: &str) -> Option<String> {
    content_type.split(';').find_map(|p| {
        let p = p.trim();
        let (name, value) = p.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_owned())
    })
}

/// Splits a multipart body into its parts (headers and content together).
fn parts<'a>(body: &'a str, boundary: &str) -> Vec<&'a str> {
    let delimiter = format!("--{boundary}");
    let mut out = Vec::new();
    for piece in body.split(delimiter.as_str()).skip(1) {
        if piece.starts_with("--") {
            break;
        }
        out.push(piece.trim_start_matches(['\r', '\n']));
    }
    out
}

/// Headers and content of a MIME part or an HTTP message.
fn head_and_rest(part: &str) -> (&str, &str) {
    if let Some(i) = part.find("\r\n\r\n") {
        (&part[..i], &part[i + 4..])
    } else if let Some(i) = part.find("\n\n") {
        (&part[..i], &part[i + 2..])
    } else {
        (part, "")
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads an embedded `application/http` response.
fn http_response(part: &str) -> Option<PartAnswer> {
    let (_mime_head, message) = head_and_rest(part);
    let (head, body) = head_and_rest(message);
    let status_line = head.lines().next()?;
    let status = status_line.split_whitespace().nth(1)?.parse().ok()?;
    Some(PartAnswer {
        status,
        body: body.trim_end_matches(['\r', '\n']).to_owned(),
    })
}

/// One answer per changeset, in order; `None` when the body is not a
/// multipart answer this module can read.
pub fn parse(content_type: &str, body: &str) -> Option<Vec<PartAnswer>> {
    let outer = boundary(content_type)?;
    let mut answers = Vec::new();
    for part in parts(body, &outer) {
        let (head, _) = head_and_rest(part);
        let kind = header(head, "content-type").unwrap_or("");
        if kind.to_ascii_lowercase().starts_with("multipart/mixed") {
            let inner = boundary(kind)?;
            let (_, content) = head_and_rest(part);
            let responses: Vec<PartAnswer> = parts(content, &inner)
                .into_iter()
                .map(http_response)
                .collect::<Option<_>>()?;
            let first = responses
                .iter()
                .find(|r| !(200..300).contains(&r.status))
                .or_else(|| responses.first())?
                .clone();
            answers.push(first);
        } else {
            answers.push(http_response(part)?);
        }
    }
    Some(answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_sap_answer_with_a_failed_changeset_reads_as_one_status_per_changeset() {
        let body = "--batchresp\r\nContent-Type: multipart/mixed; boundary=csr1\r\n\r\n--csr1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nHTTP/1.1 201 Created\r\nContent-Type: application/json\r\n\r\n{\"d\":{\"ConfirmationText\":\"a\"}}\r\n--csr1--\r\n--batchresp\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nHTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\r\n{\"error\":{\"message\":{\"value\":\"Order 1000123 is closed\"}}}\r\n--batchresp--\r\n";
        let answers = parse("multipart/mixed; boundary=batchresp", body).expect("parses");
        assert_eq!(answers.len(), 2);
        assert_eq!(answers[0].status, 201);
        assert_eq!(answers[1].status, 400);
        assert!(answers[1].body.contains("is closed"));
    }

    #[test]
    fn what_build_writes_parse_reads_back_as_requests() {
        let (kind, body) = build(
            "k1",
            "application/json",
            &[
                Changeset {
                    path: "ProdnOrdConf2".into(),
                    body: "{\"a\":1}".into(),
                },
                Changeset {
                    path: "ProdnOrdConf2".into(),
                    body: "{\"a\":2}".into(),
                },
            ],
        );
        assert_eq!(boundary(&kind).as_deref(), Some("batch_k1"));
        assert_eq!(body.matches("POST ProdnOrdConf2 HTTP/1.1").count(), 2);
        assert!(body.ends_with("--batch_k1--\r\n"));
        assert!(parse("text/plain", &body).is_none());
    }
}
