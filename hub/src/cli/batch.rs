//! `hub send --from FILE`: many directives from JSON lines, one
//! `CreateDirectiveRequest` in its proto3 JSON form per line, created
//! through `CreateDirectives` in chunks. Every line is parsed before
//! anything is sent; then each gets its own result or error, one row each.

use std::fmt::Write as _;
use std::io::{Read, Write};

use hub_proto::v1 as proto;
use proto::create_directives_result::Outcome;

use super::render::{self, Table};
use super::{Admin, CliError, code_name};

/// Most items in one CreateDirectives call (the hub's limit).
const MAX_ITEMS: usize = 1000;
/// Most encoded bytes of items in one call: well under the hub's default
/// message limit (4 MiB), so large payloads go in smaller chunks.
const MAX_BYTES: usize = 3 << 20;
/// Line numbers listed in one message at most.
const LINES_SHOWN: usize = 10;

/// Sends the directives of `from` (a path, or `-` for standard input) and
/// prints one row per line, or the replies as one CreateDirectivesResponse
/// with `json`. Fails if any line failed.
pub async fn send_from(
    admin: &mut Admin,
    from: &str,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let text = read(from).map_err(|e| CliError::Usage(format!("--from {from}: {e}")))?;
    let lines = parse(&text).map_err(|e| CliError::Usage(format!("--from {from}: {e}")))?;
    let total = lines.len();
    let mut numbers = Vec::with_capacity(total);
    let mut reply = proto::CreateDirectivesResponse::default();
    let mut failure = None;
    for chunk in chunks(lines) {
        let first = chunk[0].0;
        let (chunk_numbers, items): (Vec<_>, Vec<_>) = chunk.into_iter().unzip();
        let count = items.len();
        let req = proto::CreateDirectivesRequest {
            items,
            include_payloads: false,
        };
        let res = match admin.create_directives(req).await {
            Ok(res) => res.into_inner(),
            Err(status) => {
                // What came before is created; what is left is not known to be.
                let message = format!(
                    "{}: lines from {first} on were not confirmed{}",
                    status.message(),
                    if numbers.is_empty() {
                        String::new()
                    } else {
                        "; the ones before were sent, as listed".to_owned()
                    }
                );
                failure = Some(tonic::Status::new(status.code(), message));
                break;
            }
        };
        if res.results.len() != count {
            let message = format!(
                "the hub answered {} results for {count} items (lines from {first} on)",
                res.results.len()
            );
            failure = Some(tonic::Status::internal(message));
            break;
        }
        // The ids of a chunk whose reply would be too large are left out.
        numbers.extend(
            chunk_numbers
                .into_iter()
                .map(|n| (n, res.directives_omitted)),
        );
        reply.results.extend(res.results);
        reply.payloads_omitted |= res.payloads_omitted;
        reply.directives_omitted |= res.directives_omitted;
    }

    if json {
        render::write_json(out, &reply)?;
    } else {
        let mut t = Table::new(&["LINE", "RESULT", "GROUP", "DETAILS"]);
        for ((number, ids_omitted), result) in numbers.iter().zip(&reply.results) {
            t.row(row(*number, result, *ids_omitted));
        }
        if !reply.results.is_empty() {
            t.print(out, "")?;
        }
    }
    if let Some(status) = failure {
        return Err(CliError::Status(status));
    }
    let summary = Summary::of(&numbers, &reply);
    if summary.failed.is_empty() {
        if !json {
            writeln!(out, "{}", summary.text(total))?;
        }
        Ok(())
    } else {
        Err(CliError::ItemsFailed(summary.text(total)))
    }
}

/// The input: a file, or standard input for `-`.
fn read(from: &str) -> std::io::Result<String> {
    if from == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        Ok(text)
    } else {
        std::fs::read_to_string(from)
    }
}

/// Every non-blank line as a request, with its line number (from 1); the
/// first malformed line is the error, naming any others.
fn parse(text: &str) -> Result<Vec<(usize, proto::CreateDirectiveRequest)>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut parsed = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok(req) => parsed.push((i + 1, req)),
            Err(e) => bad.push((i + 1, e)),
        }
    }
    if let Some((number, error)) = bad.first() {
        let mut message = format!("line {number}: {error}; nothing was sent");
        if bad.len() > 1 {
            let others: Vec<usize> = bad[1..].iter().map(|(n, _)| *n).collect();
            let _ = write!(message, " (malformed too: {})", line_list(&others));
        }
        return Err(message);
    }
    if parsed.is_empty() {
        return Err("no directives in it: expected one JSON object per line".into());
    }
    Ok(parsed)
}

/// One line: a JSON object in the proto3 JSON form of
/// CreateDirectiveRequest (field names in camelCase or as in the .proto;
/// unknown fields refused).
fn parse_line(line: &str) -> Result<proto::CreateDirectiveRequest, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let Some(object) = value.as_object() else {
        return Err(
            r#"expected a JSON object, e.g. {"target": {"spokeName": "a"}, "type": "sync_doc", "payload": {}}"#
                .into(),
        );
    };
    serde_json::from_value(value.clone()).map_err(|e| {
        // The error does not say where: name the first field that fails
        // on its own.
        let alone = |(k, v): &(&String, &serde_json::Value)| {
            let one =
                serde_json::Value::Object([((*k).clone(), (*v).clone())].into_iter().collect());
            serde_json::from_value::<proto::CreateDirectiveRequest>(one).is_err()
        };
        match object.iter().find(alone) {
            Some((field, _)) if !e.to_string().contains(&format!("`{field}`")) => {
                format!("{field}: {e}")
            }
            _ => e.to_string(),
        }
    })
}

/// Requests in calls of at most [`MAX_ITEMS`] items and about
/// [`MAX_BYTES`] (a larger item goes alone).
fn chunks(
    lines: Vec<(usize, proto::CreateDirectiveRequest)>,
) -> Vec<Vec<(usize, proto::CreateDirectiveRequest)>> {
    let mut chunks: Vec<Vec<_>> = Vec::new();
    let mut bytes = 0;
    for line in lines {
        let len = prost::Message::encoded_len(&line.1);
        let size = len + prost::length_delimiter_len(len) + 1;
        match chunks.last_mut() {
            Some(chunk) if chunk.len() < MAX_ITEMS && bytes + size <= MAX_BYTES => {
                bytes += size;
                chunk.push(line);
            }
            _ => {
                bytes = size;
                chunks.push(vec![line]);
            }
        }
    }
    chunks
}

/// One row: the line, what happened, the group, and the ids of the
/// directives created (or the line's error).
fn row(number: usize, result: &proto::CreateDirectivesResult, ids_omitted: bool) -> Vec<String> {
    let (result, group, details) = match &result.outcome {
        Some(Outcome::Created(c)) => {
            let ids: Vec<&str> = c.directives.iter().map(|d| d.id.as_str()).collect();
            let mut details = match (ids.is_empty(), ids_omitted, c.skipped_spokes) {
                (false, _, _) => ids.join(","),
                (true, true, _) => "ids left out of the hub's reply (too large)".to_owned(),
                (true, false, 0) => "no directive: no spoke matched".to_owned(),
                (true, false, _) => "no directive".to_owned(),
            };
            if c.skipped_spokes > 0 {
                let _ = write!(
                    details,
                    "; {} matching spoke(s) skipped: they did not declare this type (\"force\": true)",
                    c.skipped_spokes
                );
            }
            let result = if c.idempotent_replay {
                "replayed"
            } else {
                "created"
            };
            (result, c.group_id.clone(), details)
        }
        Some(Outcome::Error(e)) => (
            "failed",
            "-".to_owned(),
            format!(
                "{}: {}",
                code_name(tonic::Code::from_i32(e.code)),
                e.message
            ),
        ),
        None => (
            "failed",
            "-".to_owned(),
            "the hub gave no result for this line".to_owned(),
        ),
    };
    vec![number.to_string(), result.to_owned(), group, details]
}

/// What a batch did, for its last line.
struct Summary {
    failed: Vec<usize>,
    directives: usize,
    replayed: usize,
    skipped: u32,
    ids_omitted: bool,
}

impl Summary {
    fn of(numbers: &[(usize, bool)], reply: &proto::CreateDirectivesResponse) -> Self {
        let mut s = Self {
            failed: Vec::new(),
            directives: 0,
            replayed: 0,
            skipped: 0,
            ids_omitted: reply.directives_omitted,
        };
        for ((number, _), result) in numbers.iter().zip(&reply.results) {
            match &result.outcome {
                Some(Outcome::Created(c)) => {
                    s.skipped += c.skipped_spokes;
                    if c.idempotent_replay {
                        s.replayed += 1;
                    } else {
                        s.directives += c.directives.len();
                    }
                }
                _ => s.failed.push(*number),
            }
        }
        s
    }

    fn text(&self, total: usize) -> String {
        let mut text = if self.failed.is_empty() {
            format!("{total} line(s) sent")
        } else {
            format!(
                "{} of {total} line(s) failed ({})",
                self.failed.len(),
                line_list(&self.failed)
            )
        };
        if self.ids_omitted {
            text.push_str(
                ": directives created; the hub left their ids out of its reply (too large)",
            );
        } else {
            let _ = write!(text, ": {} directive(s) created", self.directives);
        }
        if self.replayed > 0 {
            let _ = write!(
                text,
                ", {} line(s) with an idempotency key seen before",
                self.replayed
            );
        }
        if self.skipped > 0 {
            let _ = write!(
                text,
                ", {} matching spoke(s) skipped: they did not declare the type",
                self.skipped
            );
        }
        text
    }
}

/// "line 3" or "lines 3, 7, 9", the first few of many.
fn line_list(numbers: &[usize]) -> String {
    let shown: Vec<String> = numbers
        .iter()
        .take(LINES_SHOWN)
        .map(ToString::to_string)
        .collect();
    let more = match numbers.len() {
        n if n > LINES_SHOWN => format!(", ... ({n} in all)"),
        _ => String::new(),
    };
    match numbers.len() {
        1 => format!("line {}", shown[0]),
        _ => format!("lines {}{more}", shown.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_in_either_field_spelling_and_blank_lines_are_skipped() {
        let text = "\u{feff}{\"target\": {\"spokeName\": \"a\"}, \"type\": \"t\", \"payload\": {\"n\": 1}}\r\n\n  \n{\"target\": {\"spoke_name\": \"b\"}, \"type\": \"t\", \"idempotency_key\": \"k\", \"ackDeadline\": \"30s\"}\n";
        let lines = parse(text).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].0, 1);
        assert_eq!(lines[1].0, 4);
        assert_eq!(lines[1].1.idempotency_key, "k");
        assert_eq!(lines[1].1.ack_deadline.as_ref().unwrap().seconds, 30);
        use proto::directive_target::Target;
        assert_eq!(
            lines[1].1.target.as_ref().unwrap().target,
            Some(Target::SpokeName("b".into()))
        );
    }

    #[test]
    fn the_first_malformed_line_is_named_with_the_others() {
        let text = "{\"type\": \"t\"}\n{\"typo\": 1}\n[1]\nnot json\n";
        let err = parse(text).unwrap_err();
        assert!(err.starts_with("line 2: unknown field `typo`"), "{err}");
        assert!(err.ends_with("(malformed too: lines 3, 4)"), "{err}");
        assert!(parse("\n \n").unwrap_err().starts_with("no directives"));
    }

    #[test]
    fn chunks_hold_at_most_1000_items_and_about_3_mib() {
        let small = |n| (n, proto::CreateDirectiveRequest::default());
        let sizes: Vec<usize> = chunks((1..=2001).map(small).collect())
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, [1000, 1000, 1]);

        let big = |n| {
            let req = proto::CreateDirectiveRequest {
                r#type: "x".repeat(1 << 20),
                ..Default::default()
            };
            (n, req)
        };
        let sizes: Vec<usize> = chunks((1..=5).map(big).collect())
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, [2, 2, 1]);
    }

    #[test]
    fn line_lists_stay_short() {
        assert_eq!(line_list(&[3]), "line 3");
        assert_eq!(line_list(&[3, 7]), "lines 3, 7");
        let many: Vec<usize> = (1..=12).collect();
        assert_eq!(
            line_list(&many),
            "lines 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ... (12 in all)"
        );
    }
}
