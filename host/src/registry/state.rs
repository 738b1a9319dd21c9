//! The life of a model version as a state machine, with its tests beside it.
//!
//! `Loading` → `Ready` or `Failed` (once, by the loader), and any state → `Draining` (by an
//! unregister). A version unregistered while it loads stays `Draining`: the loader's late
//! verdict is dropped, so a swap never resurrects a version that was taken out.

use tokio::sync::watch;

/// Why a load failed, as far as the client who asked for it is concerned. The management API
/// maps each kind to an HTTP status in one place (`http::error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The archive (its files, manifest, config or bundled library) is bad: the client's error.
    BadArchive,
    /// The archive does not exist (any more).
    NotFound,
    /// The plugin refused the model's files or settings (its `INVALID_INPUT`, `NOT_FOUND`,
    /// `UNSUPPORTED`): the client's error.
    BadModel,
    /// The plugin failed or panicked while loading: the server's error, with the reason.
    PluginFault,
    /// The manifest names a built-in plugin this server does not have.
    MissingPlugin,
    /// The server process died while loading this version for the first time (an `abort()`,
    /// a segfault, an OOM kill): it is not loaded again at start-up.
    Crashed,
    /// Something in the host failed (a thread could not start, a file could not be written).
    Internal,
}

impl FailureKind {
    /// Every kind.
    pub const ALL: [FailureKind; 7] = [
        Self::BadArchive,
        Self::NotFound,
        Self::BadModel,
        Self::PluginFault,
        Self::MissingPlugin,
        Self::Crashed,
        Self::Internal,
    ];

    /// The kind [`FailureKind::name`] names.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// A short name for describe output.
    pub fn name(self) -> &'static str {
        match self {
            Self::BadArchive => "BadArchive",
            Self::NotFound => "NotFound",
            Self::BadModel => "BadModel",
            Self::PluginFault => "PluginFault",
            Self::MissingPlugin => "MissingPlugin",
            Self::Crashed => "Crashed",
            Self::Internal => "Internal",
        }
    }
}

/// A failed load: its kind and the message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadFailure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// What happened, naming the field or file where there is one.
    pub message: String,
}

impl LoadFailure {
    /// A failure of `kind`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for LoadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The life of a model version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelState {
    /// The plugin and workers are starting.
    Loading,
    /// Every `min_workers` instance is up.
    Ready,
    /// Unregistered: finishing the requests it already has, then freeing its instances.
    Draining,
    /// Loading failed; the failure says why.
    Failed(LoadFailure),
}

impl ModelState {
    /// A short name for describe output.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Loading => "Loading",
            Self::Ready => "Ready",
            Self::Draining => "Draining",
            Self::Failed(_) => "Failed",
        }
    }
}

/// A version's state, observable (`settled` waits for the loader's verdict).
#[derive(Debug)]
pub struct StateCell(watch::Sender<ModelState>);

impl StateCell {
    /// A cell starting in `state`.
    pub fn new(state: ModelState) -> Self {
        Self(watch::Sender::new(state))
    }

    /// The current state.
    pub fn get(&self) -> ModelState {
        self.0.borrow().clone()
    }

    /// The loader's verdict: leave `Loading` for `Ready` or `Failed`. Returns false (and changes
    /// nothing) when the version already left `Loading` (it was unregistered meanwhile).
    pub fn finish_loading(&self, result: Result<(), LoadFailure>) -> bool {
        let next = match result {
            Ok(()) => ModelState::Ready,
            Err(failure) => ModelState::Failed(failure),
        };
        self.0.send_if_modified(|current| {
            let loading = *current == ModelState::Loading;
            if loading {
                *current = next;
            }
            loading
        })
    }

    /// A ready version whose worker processes keep dying: `Ready` → `Failed`. Returns false
    /// (and changes nothing) from any other state.
    pub fn fail(&self, failure: LoadFailure) -> bool {
        self.0.send_if_modified(|current| {
            let ready = *current == ModelState::Ready;
            if ready {
                *current = ModelState::Failed(failure.clone());
            }
            ready
        })
    }

    /// Unregistered: from any state to `Draining`.
    pub fn start_draining(&self) {
        self.0.send_replace(ModelState::Draining);
    }

    /// Wait until the state is no longer `Loading`, and return it.
    pub async fn settled(&self) -> ModelState {
        let mut rx = self.0.subscribe();
        let settled = match rx.wait_for(|s| *s != ModelState::Loading).await {
            Ok(state) => Some(state.clone()),
            Err(_) => None,
        };
        settled.unwrap_or_else(|| self.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn a_pending_version_becomes_ready_once() {
        let cell = StateCell::new(ModelState::Loading);
        assert!(cell.finish_loading(Ok(())));
        assert_eq!(cell.get(), ModelState::Ready);
        // A second verdict changes nothing.
        assert!(!cell.finish_loading(Err(LoadFailure::new(FailureKind::Internal, "late"))));
        assert_eq!(cell.get(), ModelState::Ready);
    }

    #[test]
    fn a_pending_version_that_fails_keeps_its_reason_and_kind() {
        let cell = StateCell::new(ModelState::Loading);
        let failure = LoadFailure::new(FailureKind::PluginFault, "plugin `x` panicked");
        assert!(cell.finish_loading(Err(failure.clone())));
        assert_eq!(cell.get(), ModelState::Failed(failure));
        assert_eq!(cell.get().name(), "Failed");
    }

    #[test]
    fn a_version_unregistered_while_loading_stays_draining() {
        let cell = StateCell::new(ModelState::Loading);
        cell.start_draining();
        assert!(!cell.finish_loading(Ok(())));
        assert_eq!(cell.get(), ModelState::Draining);
    }

    #[test]
    fn settled_waits_for_the_verdict() {
        let cell = std::sync::Arc::new(StateCell::new(ModelState::Loading));
        let loader = cell.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            loader.finish_loading(Err(LoadFailure::new(
                FailureKind::BadArchive,
                "no manifest",
            )));
        });
        let state = block_on(cell.settled());
        assert_eq!(state.name(), "Failed");
        thread.join().expect("loader thread");
        // Settled at once when already settled.
        assert_eq!(block_on(cell.settled()).name(), "Failed");
    }
}
