//! Metric batches: validating points and splitting a batch into the points
//! to store and the ones to reject, each with its reason.

use std::collections::BTreeMap;

use hub_proto::v1 as proto;

use crate::error::{Error, Result};
use crate::wire::ns_of;

/// How far in the past a point's time may be.
const MAX_AGE_NS: i64 = 7 * 24 * 3600 * 1_000_000_000;
/// How far in the future a point's time may be.
const MAX_SKEW_NS: i64 = 5 * 60 * 1_000_000_000;

/// A valid point, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Domain.
    pub domain: String,
    /// Name.
    pub name: String,
    /// Finite value.
    pub value: f64,
    /// Unit.
    pub unit: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Measurement time, Unix ns.
    pub time_ns: i64,
}

/// A batch split into what is stored and what is refused.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The spoke's batch id.
    pub batch_id: String,
    /// Valid points.
    pub points: Vec<Point>,
    /// Refused points: index in the batch and reason.
    pub rejected: Vec<(u32, String)>,
}

impl Batch {
    /// Validates a batch at `now_ns`. Whole-batch problems (no id, no points,
    /// too many points) are errors; a bad point only rejects that point.
    pub fn parse(req: proto::PushMetricsRequest, max_points: usize, now_ns: i64) -> Result<Self> {
        if req.batch_id.is_empty() || req.batch_id.chars().count() > 128 {
            return Err(Error::invalid("batch_id", "must be 1 to 128 characters"));
        }
        // PostgreSQL cannot store a NUL in text, so neither backend takes it.
        if req.batch_id.contains('\0') {
            return Err(Error::invalid(
                "batch_id",
                "must not contain NUL characters",
            ));
        }
        if req.points.is_empty() {
            return Err(Error::invalid("points", "a batch needs at least one point"));
        }
        if req.points.len() > max_points {
            return Err(Error::ResourceExhausted(format!(
                "points: batch {:?} has {} points, the limit is {max_points}",
                req.batch_id,
                req.points.len()
            )));
        }
        let mut points = Vec::with_capacity(req.points.len());
        let mut rejected = Vec::new();
        for (i, p) in req.points.into_iter().enumerate() {
            match validate(p, now_ns) {
                Ok(point) => points.push(point),
                Err(reason) => rejected.push((i as u32, reason)),
            }
        }
        Ok(Self {
            batch_id: req.batch_id,
            points,
            rejected,
        })
    }
}

fn validate(p: proto::MetricPoint, now_ns: i64) -> Result<Point, String> {
    check_ident(&p.domain, 64).map_err(|r| format!("domain: {r}"))?;
    check_ident(&p.name, 128).map_err(|r| format!("name: {r}"))?;
    if !p.value.is_finite() {
        return Err("value: not finite".to_owned());
    }
    if p.unit.chars().count() > 32 {
        return Err("unit: at most 32 characters".to_owned());
    }
    if p.unit.contains('\0') {
        return Err("unit: must not contain NUL characters".to_owned());
    }
    if p.labels.len() > 16 {
        return Err("labels: at most 16 labels".to_owned());
    }
    for (k, v) in &p.labels {
        check_ident(k, 64).map_err(|r| format!("labels[{k:?}]: key {r}"))?;
        if v.chars().count() > 256 {
            return Err(format!("labels[{k:?}]: value longer than 256 characters"));
        }
    }
    let time_ns = match &p.time {
        None => return Err("time: required".to_owned()),
        Some(ts) => ns_of(ts, "time").map_err(|e| e.to_string())?,
    };
    if time_ns < now_ns.saturating_sub(MAX_AGE_NS) {
        return Err("time: more than 7 days in the past".to_owned());
    }
    if time_ns > now_ns.saturating_add(MAX_SKEW_NS) {
        return Err("time: more than 5 minutes in the future".to_owned());
    }
    Ok(Point {
        domain: p.domain,
        name: p.name,
        value: p.value,
        unit: p.unit,
        labels: p.labels.into_iter().collect(),
        time_ns,
    })
}

/// Identifiers: 1 to `max` of `[A-Za-z0-9_.-]`, starting with a letter.
fn check_ident(s: &str, max: usize) -> Result<(), String> {
    if hub_proto::rules::is_metric_ident(s, max) {
        Ok(())
    } else {
        Err(format!(
            "must be 1 to {max} characters of A-Z, a-z, 0-9, '_', '.', '-', starting with a letter"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::timestamp_ns;

    const NOW: i64 = 1_800_000_000_000_000_000;

    fn point(name: &str, value: f64) -> proto::MetricPoint {
        proto::MetricPoint {
            domain: "statistics".into(),
            name: name.into(),
            value,
            time: Some(timestamp_ns(NOW)),
            ..Default::default()
        }
    }

    #[test]
    fn bad_points_are_rejected_with_reasons_and_good_ones_kept() {
        let mut late = point("late", 1.0);
        late.time = Some(timestamp_ns(NOW - MAX_AGE_NS - 1));
        let req = proto::PushMetricsRequest {
            batch_id: "b1".into(),
            points: vec![
                point("ok", 1.0),
                point("nan", f64::NAN),
                point("bad name", 2.0),
                late,
            ],
        };
        let batch = Batch::parse(req, 100, NOW).unwrap();
        assert_eq!(batch.points.len(), 1);
        assert_eq!(batch.points[0].name, "ok");
        let reasons: Vec<_> = batch
            .rejected
            .iter()
            .map(|(i, r)| (*i, r.split(':').next().unwrap()))
            .collect();
        assert_eq!(reasons, vec![(1, "value"), (2, "name"), (3, "time")]);
    }

    #[test]
    fn a_nul_character_refuses_the_batch_id_or_the_point_with_that_unit() {
        let mut odd = point("odd", 1.0);
        odd.unit = "m\0s".into();
        let req = proto::PushMetricsRequest {
            batch_id: "b1".into(),
            points: vec![point("ok", 1.0), odd],
        };
        let batch = Batch::parse(req.clone(), 100, NOW).unwrap();
        assert_eq!(batch.points.len(), 1);
        assert_eq!(batch.rejected[0].0, 1);
        assert!(batch.rejected[0].1.starts_with("unit:"));
        let req = proto::PushMetricsRequest {
            batch_id: "b\0-1".into(),
            ..req
        };
        let e = Batch::parse(req, 100, NOW).unwrap_err();
        assert!(e.to_string().starts_with("batch_id:"), "{e}");
    }

    #[test]
    fn too_many_points_is_resource_exhausted() {
        let req = proto::PushMetricsRequest {
            batch_id: "b".into(),
            points: vec![point("a", 1.0); 3],
        };
        assert!(matches!(
            Batch::parse(req, 2, NOW),
            Err(Error::ResourceExhausted(_))
        ));
    }
}
