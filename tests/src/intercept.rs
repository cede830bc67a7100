//! One intercepting `Endpoint` for tests: [`Intercept`] forwards every call to an inner
//! endpoint and lets a [`Hooks`] value look at, answer instead of, or change what goes in and
//! comes out. A test implements only the hooks it needs; every other call passes through.
//! (Counting chunk bytes, a guest that forges chunks or lies about moves, a destination out of
//! room, a connection cut at the n-th transition: each is a few lines of hooks.)

use vmsync_core::endpoint::{
    Change, ChangeHints, ChunkData, ChunkRead, DeltaRead, Endpoint, EndpointError, MissingChunk,
    NotStaged, Outcome, Problem, ScanOptions, ScanReport, ScanScope, StageRequest,
};
use vmsync_core::{Entry, FileMeta, Hash, Manifest, RelPath};

/// What a test does to the calls through an [`Intercept`]. Every method has a default that
/// lets the call through unchanged.
pub trait Hooks: Send {
    /// A scan about to run.
    fn scanning(&mut self, _scope: &ScanScope) {}
    /// A scan's report, before the controller sees it.
    fn scanned(&mut self, report: ScanReport) -> ScanReport {
        report
    }
    /// An answer to `manifests` in place of the inner endpoint's (`None`: ask it).
    fn manifests(
        &mut self,
        _files: &[(RelPath, FileMeta)],
    ) -> Option<Vec<Result<Manifest, Problem>>> {
        None
    }
    /// Chunks read whole, before the controller sees them.
    fn chunks_read(&mut self, chunks: Vec<Option<Vec<u8>>>) -> Vec<Option<Vec<u8>>> {
        chunks
    }
    /// Chunks read as data or deltas, before the controller sees them.
    fn deltas_read(&mut self, chunks: Vec<Option<ChunkData>>) -> Vec<Option<ChunkData>> {
        chunks
    }
    /// An answer to `stage` in place of the inner endpoint's (`None`: ask it).
    fn stage(
        &mut self,
        _files: &[StageRequest],
    ) -> Option<Vec<Result<Vec<MissingChunk>, NotStaged>>> {
        None
    }
    /// The inner endpoint's answer to `stage`.
    fn staged(&mut self, _answers: &[Result<Vec<MissingChunk>, NotStaged>]) {}
    /// The answer to `stage` the controller gets, made from the inner endpoint's.
    fn restage(
        &mut self,
        answers: Vec<Result<Vec<MissingChunk>, NotStaged>>,
    ) -> Vec<Result<Vec<MissingChunk>, NotStaged>> {
        answers
    }
    /// Chunks about to be supplied.
    fn supply(&mut self, _chunks: &[(Hash, ChunkData)]) {}
    /// What becomes of a transition.
    fn transition(&mut self, _changes: &[Change]) -> Transit {
        Transit::Pass
    }
    /// An error to answer `mark` with instead of noting the generation (`None`: note it).
    fn mark(&mut self, _generation: u64) -> Option<EndpointError> {
        None
    }
    /// Change hints to answer `changes` with in place of the inner endpoint's (`None`: ask
    /// it).
    fn changes(&mut self) -> Option<ChangeHints> {
        None
    }
}

/// What becomes of a transition through an [`Intercept`].
#[derive(Debug)]
pub enum Transit {
    /// The inner endpoint makes it.
    Pass,
    /// It fails with this error, nothing applied (a lost connection).
    Fail(EndpointError),
    /// It never answers (a host killed mid-cycle: the test drops the cycle).
    Hang,
    /// The inner endpoint makes it, but the answer is this error (the guest killed right
    /// after applying it).
    LandThenFail(EndpointError),
}

/// Forwards to `inner`, through `hooks`.
pub struct Intercept<E, H> {
    pub inner: E,
    pub hooks: H,
}

impl<E: Endpoint, H: Hooks> Endpoint for Intercept<E, H> {
    async fn scan(
        &mut self,
        scope: ScanScope,
        options: ScanOptions,
    ) -> Result<ScanReport, EndpointError> {
        self.hooks.scanning(&scope);
        let report = self.inner.scan(scope, options).await?;
        Ok(self.hooks.scanned(report))
    }
    async fn manifests(
        &mut self,
        files: Vec<(RelPath, FileMeta)>,
    ) -> Result<Vec<Result<Manifest, Problem>>, EndpointError> {
        match self.hooks.manifests(&files) {
            Some(answer) => Ok(answer),
            None => self.inner.manifests(files).await,
        }
    }
    async fn read_chunks(
        &mut self,
        reads: Vec<ChunkRead>,
    ) -> Result<Vec<Option<Vec<u8>>>, EndpointError> {
        let chunks = self.inner.read_chunks(reads).await?;
        Ok(self.hooks.chunks_read(chunks))
    }
    async fn read_deltas(
        &mut self,
        reads: Vec<DeltaRead>,
    ) -> Result<Vec<Option<ChunkData>>, EndpointError> {
        let chunks = self.inner.read_deltas(reads).await?;
        Ok(self.hooks.deltas_read(chunks))
    }
    async fn stage(
        &mut self,
        files: Vec<StageRequest>,
    ) -> Result<Vec<Result<Vec<MissingChunk>, NotStaged>>, EndpointError> {
        if let Some(answer) = self.hooks.stage(&files) {
            return Ok(answer);
        }
        let answers = self.inner.stage(files).await?;
        self.hooks.staged(&answers);
        let answers = self.hooks.restage(answers);
        Ok(answers)
    }
    async fn supply(&mut self, chunks: Vec<(Hash, ChunkData)>) -> Result<Vec<Hash>, EndpointError> {
        self.hooks.supply(&chunks);
        self.inner.supply(chunks).await
    }
    async fn transition(&mut self, changes: Vec<Change>) -> Result<Vec<Outcome>, EndpointError> {
        match self.hooks.transition(&changes) {
            Transit::Pass => self.inner.transition(changes).await,
            Transit::Fail(e) => Err(e),
            Transit::Hang => std::future::pending().await,
            Transit::LandThenFail(e) => {
                self.inner.transition(changes).await?;
                Err(e)
            }
        }
    }
    async fn put_back(
        &mut self,
        items: Vec<(RelPath, Entry)>,
    ) -> Result<Vec<Outcome>, EndpointError> {
        self.inner.put_back(items).await
    }
    async fn mark(&mut self, generation: u64) -> Result<(), EndpointError> {
        match self.hooks.mark(generation) {
            Some(e) => Err(e),
            None => self.inner.mark(generation).await,
        }
    }
    async fn changes(&mut self) -> Result<ChangeHints, EndpointError> {
        match self.hooks.changes() {
            Some(hints) => Ok(hints),
            None => self.inner.changes().await,
        }
    }
}
