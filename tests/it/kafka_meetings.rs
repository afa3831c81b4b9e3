//! Meetings shared through a compacted topic (`kafka.meetings_topic`): a meeting posted to one
//! instance is reported by the others, survives a restart of all of them, and is deleted by a
//! tombstone; writes need the API token; a record that is not a meeting is counted and skipped.

use crate::kafka_support::*;
use crate::support::{http_get, http_request_with};

use super::test_dir;
use std::time::Duration;

const TOKEN: &str = "meetings-test-token";

fn meeting(id: &str, site: &str) -> String {
    serde_json::json!({
        "id": id,
        "title": "Giao ban tháng 12",
        "start": "2026-12-15T14:00:00+07:00",
        "duration_mins": 90,
        "participants": [{ "sites": [site] }]
    })
    .to_string()
}

/// The ids `GET /api/meetings` lists.
fn listed(i: &Instance) -> Vec<String> {
    let Ok((200, body)) = http_get(i.http, "/api/meetings") else { return vec![] };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["meetings"].as_array().unwrap().iter().map(|m| m["meeting"]["id"].as_str().unwrap().to_string()).collect()
}

fn ready(i: &Instance) -> bool {
    http_get(i.http, "/readyz").is_ok_and(|(s, _)| s == 200)
}

#[test]
fn a_meeting_posted_to_one_instance_is_shared_survives_restarts_and_needs_the_token() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    broker.create_topic("flows", 2);
    broker.create_topic_with("meetings", 1, &["cleanup.policy=compact"]);
    let checkpoints = dir.path().join("ckpt");
    let env = [("SITEFLOW_KAFKA__MEETINGS_TOPIC", "meetings"), ("SITEFLOW_API__TOKEN", TOKEN)];
    let start = |name| Instance::start_with_env(dir.path(), name, &broker, &[("flows", "goflow2_json")], &checkpoints, "", &env);
    let (mut a, mut b) = (start("a"), start("b"));
    assert!(wait_until(Duration::from_secs(90), || ready(&a) && ready(&b)), "not ready:\n{}\n{}", a.log_summary(), b.log_summary());
    let site = &sites()[0].id;
    let auth = format!("Bearer {TOKEN}");

    // Writes need the token.
    let body = meeting("giao-ban-12", site);
    let (status, text) = http_request_with(a.http, "POST", "/api/meetings", Some(&body), &[]).unwrap();
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("api.token"), "the 401 says what is needed: {text}");
    let (status, _) = http_request_with(a.http, "POST", "/api/meetings", Some(&body), &[("Authorization", "Bearer wrong")]).unwrap();
    assert_eq!(status, 401);
    assert!(listed(&a).is_empty());

    // Posted to a: a lists it at once (it read its write back), b soon after.
    let (status, text) = http_request_with(a.http, "POST", "/api/meetings", Some(&body), &[("Authorization", &auth)]).unwrap();
    assert_eq!(status, 201, "{text}");
    assert_eq!(listed(&a), ["giao-ban-12"]);
    assert!(wait_until(Duration::from_secs(30), || listed(&b) == ["giao-ban-12"]), "b does not report a's meeting: {:?}", listed(&b));
    let (status, report) = http_get(b.http, "/api/meetings/giao-ban-12/readiness").unwrap();
    assert_eq!(status, 200, "{report}");
    assert!(report.contains(site.as_str()), "{report}");
    // The same id again is refused; a second meeting through b.
    let (status, _) = http_request_with(b.http, "POST", "/api/meetings", Some(&body), &[("Authorization", &auth)]).unwrap();
    assert_eq!(status, 400);
    let second = meeting("hop-tinh", &sites()[1].id);
    assert_eq!(http_request_with(b.http, "POST", "/api/meetings", Some(&second), &[("Authorization", &auth)]).unwrap().0, 201);

    // A record that is not a meeting, written by someone else: counted, skipped, nothing stops.
    let producer = broker.producer();
    let bad: rdkafka::producer::BaseRecord<'_, str, [u8]> =
        rdkafka::producer::BaseRecord::to("meetings").key("broken").payload(b"{not json".as_slice());
    producer.send(bad).map_err(|(e, _)| e).unwrap();
    flush(&producer);
    let counted = wait_until(Duration::from_secs(30), || {
        a.metric("siteflow_meetings_topic_rejected_total", "") == Some(1.0)
            && b.metric("siteflow_meetings_topic_rejected_total", "") == Some(1.0)
    });
    assert!(counted, "the bad record is counted once by each instance");

    // Every instance restarts: both meetings come back from the topic before /readyz.
    a.terminate();
    b.terminate();
    a.restart();
    b.restart();
    assert!(wait_until(Duration::from_secs(90), || ready(&a) && ready(&b)), "not ready after restart:\n{}", a.log_summary());
    for i in [&a, &b] {
        let mut ids = listed(i);
        ids.sort();
        assert_eq!(ids, ["giao-ban-12", "hop-tinh"], "meetings after a restart of every instance");
    }

    // Deleted through b (a tombstone): gone from a too, and after another restart.
    let (status, _) = http_request_with(b.http, "DELETE", "/api/meetings/giao-ban-12", None, &[]).unwrap();
    assert_eq!(status, 401);
    let (status, text) = http_request_with(b.http, "DELETE", "/api/meetings/giao-ban-12", None, &[("Authorization", &auth)]).unwrap();
    assert_eq!(status, 204, "{text}");
    assert_eq!(listed(&b), ["hop-tinh"]);
    assert!(wait_until(Duration::from_secs(30), || listed(&a) == ["hop-tinh"]), "a still lists the deleted meeting: {:?}", listed(&a));
    assert_eq!(http_request_with(a.http, "DELETE", "/api/meetings/giao-ban-12", None, &[("Authorization", &auth)]).unwrap().0, 404);
    a.terminate();
    a.restart();
    assert!(wait_until(Duration::from_secs(90), || ready(&a)), "a not ready:\n{}", a.log_summary());
    assert_eq!(listed(&a), ["hop-tinh"]);
}
