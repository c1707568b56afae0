//! Enrollment safe to retry: `RegisterRequest.proposed_key`. A retry with
//! the enrollment token and the name's current key answers as the first
//! call did; any other key, or a key rotated or revoked since, keeps the
//! name taken; a malformed key is refused naming the field.

use hub_proto::v1 as proto;
use tonic::Code;

use crate::support::*;

/// 64 hex characters, as a client makes them.
fn key(c: char) -> String {
    c.to_string().repeat(64)
}

fn enroll(name: &str, proposed_key: &str, version: &str) -> tonic::Request<proto::RegisterRequest> {
    let req = proto::RegisterRequest {
        name: name.into(),
        capabilities: vec![proto::Capability {
            directive_type: "sync_doc".into(),
            version: "1".into(),
        }],
        version: version.into(),
        proposed_key: proposed_key.into(),
        ..Default::default()
    };
    authed(req, ENROLLMENT_TOKEN)
}

/// How many events of `kind` the hub logged.
async fn count_events(hub: &TestHub, kind: proto::EventType) -> usize {
    let req = proto::WatchEventsRequest {
        types: vec![kind.into()],
        stop_after_replay: true,
        ..Default::default()
    };
    let mut events = hub
        .admin()
        .await
        .watch_events(authed(req, ADMIN_TOKEN))
        .await
        .expect("WatchEvents")
        .into_inner();
    let mut n = 0;
    while events.message().await.expect("the event stream").is_some() {
        n += 1;
    }
    n
}

#[tokio::test]
async fn a_retry_with_the_proposed_key_answers_as_the_first_call() {
    let hub = TestHub::start().await;
    let mut client = hub.spoke_client().await;
    let first = client
        .register(enroll("billing", &key('a'), "1.0.0"))
        .await
        .expect("the first enrollment")
        .into_inner();
    assert_eq!(first.spoke_key, key('a'), "the proposed key is echoed");

    // The reply was lost: the spoke retries, having moved on a version.
    let again = client
        .register(enroll("billing", &key('a'), "1.0.1"))
        .await
        .expect("the same enrollment again")
        .into_inner();
    assert_eq!(again.spoke_key, key('a'));
    let (a, b) = (first.spoke.unwrap(), again.spoke.unwrap());
    assert_eq!(a.id, b.id, "the same spoke");
    assert_eq!(b.version, "1.0.1", "updated as Register does");
    assert!(again.hints.is_some());
    assert_eq!(
        count_events(&hub, proto::EventType::SpokeRegistered).await,
        1
    );
    assert_eq!(count_events(&hub, proto::EventType::SpokeUpdated).await, 1);

    // The key works, and it stays the spoke's key across a hub restart.
    let mut hub = hub;
    hub.restart().await;
    let mut client = hub.spoke_client().await;
    let heartbeat = proto::HeartbeatRequest {
        status: proto::SpokeStatus::Ok.into(),
        ..Default::default()
    };
    client
        .heartbeat(authed(heartbeat, &key('a')))
        .await
        .expect("the proposed key authenticates");
    let after_restart = client
        .register(enroll("billing", &key('a'), "1.0.1"))
        .await
        .expect("a retry after a hub restart")
        .into_inner();
    assert_eq!(after_restart.spoke.unwrap().id, a.id);
}

#[tokio::test]
async fn another_key_or_none_keeps_the_name_taken() {
    let hub = TestHub::start().await;
    let mut client = hub.spoke_client().await;
    client
        .register(enroll("billing", &key('a'), "1"))
        .await
        .unwrap();
    assert_code(
        client.register(enroll("billing", &key('b'), "1")).await,
        Code::AlreadyExists,
        "billing",
    );
    assert_code(
        client.register(enroll("billing", "", "1")).await,
        Code::AlreadyExists,
        "billing",
    );
    // A spoke the hub made the key for cannot be claimed by a guess either.
    let issued = hub.register("payroll", &[], &[]).await;
    assert_code(
        client.register(enroll("payroll", &key('c'), "1")).await,
        Code::AlreadyExists,
        "payroll",
    );
    // Nor can a new name take a key another spoke holds.
    assert_code(
        client.register(enroll("thief", &key('a'), "1")).await,
        Code::AlreadyExists,
        "proposed_key",
    );
    assert_code(
        client.register(enroll("thief", &issued.key, "1")).await,
        Code::AlreadyExists,
        "proposed_key",
    );
    let names: Vec<String> = hub
        .admin()
        .await
        .list_spokes(authed(proto::ListSpokesRequest::default(), ADMIN_TOKEN))
        .await
        .unwrap()
        .into_inner()
        .spokes
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["billing", "payroll"], "nothing else was registered");
}

#[tokio::test]
async fn after_rotate_or_revoke_the_old_proposed_key_no_longer_enrolls() {
    let hub = TestHub::start().await;
    let mut client = hub.spoke_client().await;
    let mut admin = hub.admin().await;

    client
        .register(enroll("rotated", &key('r'), "1"))
        .await
        .unwrap();
    let req = proto::RotateSpokeKeyRequest {
        spoke_name: "rotated".into(),
        ..Default::default()
    };
    let new = admin
        .rotate_spoke_key(authed(req, ADMIN_TOKEN))
        .await
        .unwrap()
        .into_inner()
        .spoke_key;
    assert_code(
        client.register(enroll("rotated", &key('r'), "1")).await,
        Code::AlreadyExists,
        "rotated",
    );
    // Proposing the key it holds now is the same enrollment again.
    let again = client
        .register(enroll("rotated", &new, "1"))
        .await
        .expect("the current key re-enrolls")
        .into_inner();
    assert_eq!(again.spoke_key, new);

    client
        .register(enroll("revoked", &key('v'), "1"))
        .await
        .unwrap();
    let req = proto::RevokeSpokeRequest {
        spoke_name: "revoked".into(),
        ..Default::default()
    };
    admin.revoke_spoke(authed(req, ADMIN_TOKEN)).await.unwrap();
    assert_code(
        client.register(enroll("revoked", &key('v'), "1")).await,
        Code::AlreadyExists,
        "revoked",
    );
    let stored = hub.spoke("revoked").await;
    assert_eq!(
        stored.health,
        proto::SpokeHealth::Revoked as i32,
        "still revoked"
    );
}

#[tokio::test]
async fn a_malformed_proposed_key_is_refused_naming_the_field() {
    let hub = TestHub::start().await;
    let mut client = hub.spoke_client().await;
    for bad in [
        "a".repeat(31),
        "a".repeat(129),
        format!("{} {}", "a".repeat(20), "b".repeat(20)),
        format!("{}é", "a".repeat(40)),
    ] {
        let result = client.register(enroll("billing", &bad, "1")).await;
        assert_code(result, Code::InvalidArgument, "proposed_key");
    }
    // Well-formed, but whoever holds the token could then be this spoke.
    let result = client
        .register(enroll("billing", ENROLLMENT_TOKEN, "1"))
        .await;
    assert_code(result, Code::InvalidArgument, "enrollment token");
    // Nothing was registered.
    let req = proto::GetSpokeRequest {
        spoke_name: "billing".into(),
        ..Default::default()
    };
    let missing = hub.admin().await.get_spoke(authed(req, ADMIN_TOKEN)).await;
    assert_code(missing, Code::NotFound, "billing");
    // The shortest and longest forms are taken.
    for ok in ["-_.~".repeat(8), "Z9".repeat(64)] {
        let name = format!("ok-{}", ok.len());
        let reply = client
            .register(enroll(&name, &ok, "1"))
            .await
            .expect("a well-formed key")
            .into_inner();
        assert_eq!(reply.spoke_key, ok);
    }
}

#[tokio::test]
async fn a_spoke_deleted_before_its_enrollment_was_confirmed_enrolls_anew_with_its_key() {
    let mut hub = TestHub::start().await;
    let mut client = hub.spoke_client().await;
    let first = client
        .register(enroll("billing", &key('d'), "1"))
        .await
        .unwrap()
        .into_inner();
    // The reply was lost; the operator deletes the spoke that never
    // connected. The spoke's retry creates it again, with the same key.
    let req = proto::DeleteSpokeRequest {
        spoke_name: "billing".into(),
        ..Default::default()
    };
    hub.admin()
        .await
        .delete_spoke(authed(req, ADMIN_TOKEN))
        .await
        .unwrap();
    let again = client
        .register(enroll("billing", &key('d'), "1"))
        .await
        .expect("the freed key enrolls again")
        .into_inner();
    assert_ne!(again.spoke.unwrap().id, first.spoke.unwrap().id);
    assert_eq!(again.spoke_key, key('d'));
    // Stored: the hub restarts with it.
    hub.restart().await;
    let heartbeat = proto::HeartbeatRequest {
        status: proto::SpokeStatus::Ok.into(),
        ..Default::default()
    };
    hub.spoke_client()
        .await
        .heartbeat(authed(heartbeat, &key('d')))
        .await
        .expect("the key works after a restart");
}
