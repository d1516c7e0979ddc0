//! Shared helpers for plant-edge's end-to-end and crash tests.

pub mod crash {
    //! Names shared by the journal crash test and its child process.

    use uuid::Uuid;

    /// The one sink the crash child registers.
    pub const SINK: &str = "archive";
    /// The sources the crash child appends from concurrently.
    pub const SOURCES: [&str; 4] = ["press1", "press2", "weld1", "paint1"];

    /// The deterministic id of the `n`th event of `source`.
    pub fn crash_event_id(source: &str, n: u64) -> Uuid {
        buffer::id::counter_event_id(source, "good", 0, n)
    }
}
