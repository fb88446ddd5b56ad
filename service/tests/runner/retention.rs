//! Deleting a session removes its workspace once nothing can resume it:
//! at once when the runner sees the deletion in the feed, and, for a runner
//! that was down meanwhile, when it starts again, whether it then catches
//! the `session.deleted` from the feed or the event was purged since (the
//! start-up sweep removes workspaces of sessions the service answers 404
//! for). Workspaces of sessions that still exist stay.

use std::time::Duration;

use serde_json::json;

use crate::support::eventually;
use crate::support::rig::Rig;
use crate::support::runner::{InProcessRunner, runner_settings, worker_env};
use crate::support::serve::retention_run;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_session_removes_its_workspace() {
    let rig = Rig::start().await;
    let id = rig
        .create_local(json!({"prompt": "Say hello [quick]"}))
        .await;
    rig.until_status(&id, "completed", Duration::from_secs(60))
        .await;
    let dir = rig.runner.root.join(&id);
    assert!(
        dir.join("claude").is_dir(),
        "the workspace holds the transcript"
    );
    rig.api.delete(&id).await.expect(204);
    eventually(
        "the workspace to be removed",
        Duration::from_secs(20),
        || async { (!dir.exists()).then_some(()) },
    )
    .await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_down_during_a_delete_or_a_purge_removes_the_workspace_when_it_starts() {
    let rig = Rig::start().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            rig.create_local(json!({"prompt": "Say hello [quick]"}))
                .await,
        );
    }
    for id in &ids {
        rig.until_status(id, "completed", Duration::from_secs(60))
            .await;
    }
    let Rig {
        api, fake, runner, ..
    } = rig;
    let root = runner.halt().await;
    let [deleted, purged, kept] = [0, 1, 2].map(|i| ids[i].clone());
    for id in &ids {
        assert!(root.join(id).is_dir());
    }
    // While no runner watches: one deleted, one deleted and purged.
    api.delete(&deleted).await.expect(204);
    api.delete(&purged).await.expect(204);
    let db = api.db.connect().await;
    sea_orm::ConnectionTrait::execute_unprepared(
        &db,
        &format!(
            "UPDATE session_tombstones SET deleted_at = deleted_at - interval '8 days' \
             WHERE session_id = '{purged}'"
        ),
    )
    .await
    .unwrap();
    db.close().await.ok();
    let (ok, out) = retention_run(
        &api.db.url,
        &[("APP__RETENTION__PURGE_AFTER_SECS", "604800")],
        false,
    );
    assert!(ok && out.contains("purged the streams of 1"), "{out}");
    let events = api
        .db
        .sql_i64(&format!(
            "SELECT count(*) FROM events WHERE aggregate_id = '{purged}'"
        ))
        .await;
    assert_eq!(events, 0, "the runner can never see this deletion");

    let runner = InProcessRunner::start(runner_settings(&api, &root), worker_env(&fake.url));
    eventually(
        "the deleted sessions' workspaces to be removed",
        Duration::from_secs(30),
        || async { (!root.join(&deleted).exists() && !root.join(&purged).exists()).then_some(()) },
    )
    .await;
    runner.until_resyncs(1).await;
    assert!(
        root.join(&kept).is_dir(),
        "a live session's workspace stays"
    );
    runner.stop().await;
    fake.stop().await;
    api.teardown().await;
}
