//! Safe handles over csrc/c10d_bridge.cpp: a c10d `TCPStore` client (or server, on rank 0), a
//! `ProcessGroupNCCL`, and the `Work` of an NCCL collective in flight. Each bridge call returns
//! NULL or a malloc'd error message; `sys::ffi::check` turns that into an `anyhow::Error`.

use std::ffi::{c_char, c_int, c_void, CString};
use std::time::Duration;

use anyhow::{anyhow, Result};
use tch::Tensor;

use crate::sys::ffi::{self, check};

extern "C" {
    fn charlm_have_nccl() -> c_int;

    fn charlm_store_connect(
        host: *const c_char,
        port: u16,
        is_server: c_int,
        timeout_ms: i64,
        prefix: *const c_char,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn charlm_store_free(store: *mut c_void);
    fn charlm_store_set_timeout(store: *mut c_void, timeout_ms: i64) -> *mut c_char;
    fn charlm_store_set(
        store: *mut c_void,
        key: *const c_char,
        data: *const u8,
        len: usize,
    ) -> *mut c_char;
    fn charlm_store_get(
        store: *mut c_void,
        key: *const c_char,
        data: *mut *mut u8,
        len: *mut usize,
    ) -> *mut c_char;
    fn charlm_store_add(
        store: *mut c_void,
        key: *const c_char,
        delta: i64,
        out: *mut i64,
    ) -> *mut c_char;
    fn charlm_store_wait(
        store: *mut c_void,
        keys: *const *const c_char,
        n: usize,
        timeout_ms: i64,
    ) -> *mut c_char;
    fn charlm_store_wait_ready(
        store: *mut c_void,
        keys: *const *const c_char,
        n: usize,
        timeout_ms: i64,
        ready: *mut c_int,
    ) -> *mut c_char;
    fn charlm_store_check(
        store: *mut c_void,
        key: *const c_char,
        exists: *mut c_int,
    ) -> *mut c_char;
    fn charlm_store_set_if_absent(
        store: *mut c_void,
        key: *const c_char,
        data: *const u8,
        len: usize,
        out: *mut *mut u8,
        out_len: *mut usize,
    ) -> *mut c_char;
    fn charlm_store_list_keys(
        store: *mut c_void,
        out: *mut *mut u8,
        out_len: *mut usize,
    ) -> *mut c_char;
    fn charlm_store_delete(
        store: *mut c_void,
        key: *const c_char,
        existed: *mut c_int,
    ) -> *mut c_char;
    fn charlm_store_num_keys(store: *mut c_void, out: *mut i64) -> *mut c_char;

    fn charlm_nccl_new(
        store: *mut c_void,
        prefix: *const c_char,
        rank: c_int,
        size: c_int,
        device: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn charlm_nccl_free(nccl: *mut c_void);
    fn charlm_nccl_all_reduce(
        nccl: *mut c_void,
        tensors: *const *mut c_void,
        n: usize,
        op: c_int,
        work: *mut *mut c_void,
    ) -> *mut c_char;
    fn charlm_nccl_broadcast(
        nccl: *mut c_void,
        tensors: *const *mut c_void,
        n: usize,
        root: c_int,
        work: *mut *mut c_void,
    ) -> *mut c_char;
    fn charlm_nccl_reduce_scatter(
        nccl: *mut c_void,
        input: *mut c_void,
        output: *mut c_void,
        op: c_int,
        work: *mut *mut c_void,
    ) -> *mut c_char;
    fn charlm_nccl_all_gather(
        nccl: *mut c_void,
        input: *mut c_void,
        output: *mut c_void,
        work: *mut *mut c_void,
    ) -> *mut c_char;
    fn charlm_work_wait(work: *mut c_void) -> *mut c_char;
    fn charlm_work_free(work: *mut c_void);
}

fn c_string(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| anyhow!("{s:?} contains a NUL byte"))
}

/// Copies and frees a buffer the bridge malloc'd: `len` initialised bytes (a 1-byte allocation
/// when `len` is 0).
fn take_buffer(data: *mut u8, len: usize) -> Vec<u8> {
    // SAFETY: the bridge's contract above.
    let value = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
    // SAFETY: freed once, by the allocator that made it.
    unsafe { ffi::free(data.cast()) };
    value
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// Whether the bridge was compiled with ProcessGroupNCCL (it is whenever libtorch has CUDA).
pub fn have_nccl() -> bool {
    // SAFETY: a constant query.
    unsafe { charlm_have_nccl() != 0 }
}

/// A c10d TCPStore: its host (rank 0, or `launch` on node 0) runs the server in a background
/// thread; every rank is a client.
pub struct Store(*mut c_void);

// SAFETY: the C++ TCPStore has no thread affinity; `&self` methods are only used by one thread at a
// time because the process group that owns it is not `Sync`.
unsafe impl Send for Store {}

impl Store {
    /// Connects (retrying until `timeout`) to host:port; with `serve` also listens there. Every
    /// key of the handle lives under `prefix/` when `prefix` is not empty.
    pub fn connect(
        host: &str,
        port: u16,
        serve: bool,
        timeout: Duration,
        prefix: &str,
    ) -> Result<Self> {
        let (host, prefix) = (c_string(host)?, c_string(prefix)?);
        let mut out = std::ptr::null_mut();
        // SAFETY: `host` and `prefix` outlive the call; `out` is written only on success.
        check(unsafe {
            charlm_store_connect(
                host.as_ptr(),
                port,
                c_int::from(serve),
                millis(timeout),
                prefix.as_ptr(),
                &mut out,
            )
        })?;
        Ok(Self(out))
    }

    /// The timeout of `get` and `wait` from now on.
    pub fn set_timeout(&self, timeout: Duration) -> Result<()> {
        // SAFETY: a live handle.
        check(unsafe { charlm_store_set_timeout(self.0, millis(timeout)) })
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let key = c_string(key)?;
        // SAFETY: key and value outlive the call; the bridge copies them.
        check(unsafe { charlm_store_set(self.0, key.as_ptr(), value.as_ptr(), value.len()) })
    }

    /// Waits for `key` (up to the store's timeout) and returns its value.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let key = c_string(key)?;
        let mut data = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: on success the bridge hands over a malloc'd buffer of `len` bytes.
        check(unsafe { charlm_store_get(self.0, key.as_ptr(), &mut data, &mut len) })?;
        Ok(take_buffer(data, len))
    }

    /// Adds `delta` to the integer at `key` (created at 0) and returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let key = c_string(key)?;
        let mut out = 0i64;
        // SAFETY: key outlives the call.
        check(unsafe { charlm_store_add(self.0, key.as_ptr(), delta, &mut out) })?;
        Ok(out)
    }

    /// Waits until every key exists, for at most `timeout`.
    pub fn wait(&self, keys: &[String], timeout: Duration) -> Result<()> {
        let owned = keys
            .iter()
            .map(|k| c_string(k))
            .collect::<Result<Vec<_>>>()?;
        let ptrs: Vec<*const c_char> = owned.iter().map(|k| k.as_ptr()).collect();
        // SAFETY: the strings and the pointer array outlive the call.
        check(unsafe { charlm_store_wait(self.0, ptrs.as_ptr(), ptrs.len(), millis(timeout)) })
    }

    /// Waits until every key exists, for at most `timeout`; `false` when the time ran out (the
    /// connection stays usable).
    pub fn wait_ready(&self, keys: &[String], timeout: Duration) -> Result<bool> {
        let owned = keys
            .iter()
            .map(|k| c_string(k))
            .collect::<Result<Vec<_>>>()?;
        let ptrs: Vec<*const c_char> = owned.iter().map(|k| k.as_ptr()).collect();
        let mut ready: c_int = 0;
        // SAFETY: the strings and the pointer array outlive the call.
        check(unsafe {
            charlm_store_wait_ready(
                self.0,
                ptrs.as_ptr(),
                ptrs.len(),
                millis(timeout),
                &mut ready,
            )
        })?;
        Ok(ready != 0)
    }

    /// Whether `key` exists, without waiting.
    pub fn check(&self, key: &str) -> Result<bool> {
        let key = c_string(key)?;
        let mut exists: c_int = 0;
        // SAFETY: key outlives the call.
        check(unsafe { charlm_store_check(self.0, key.as_ptr(), &mut exists) })?;
        Ok(exists != 0)
    }

    /// Sets `key` to `value` unless it exists; returns what it holds afterwards (the first
    /// writer's value).
    pub fn set_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>> {
        let key = c_string(key)?;
        let mut data = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: key and value outlive the call; on success the bridge hands over a malloc'd
        // buffer of `len` bytes.
        check(unsafe {
            charlm_store_set_if_absent(
                self.0,
                key.as_ptr(),
                value.as_ptr(),
                value.len(),
                &mut data,
                &mut len,
            )
        })?;
        Ok(take_buffer(data, len))
    }

    /// Every key the server holds (whatever this handle's prefix).
    pub fn list_keys(&self) -> Result<Vec<String>> {
        let mut data = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: on success the bridge hands over a malloc'd buffer of `len` bytes.
        check(unsafe { charlm_store_list_keys(self.0, &mut data, &mut len) })?;
        let all = take_buffer(data, len);
        Ok(all
            .split(|&b| b == 0)
            .filter(|k| !k.is_empty())
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect())
    }

    /// Deletes `key`; returns whether it existed.
    pub fn delete(&self, key: &str) -> Result<bool> {
        let key = c_string(key)?;
        let mut existed: c_int = 0;
        // SAFETY: key outlives the call.
        check(unsafe { charlm_store_delete(self.0, key.as_ptr(), &mut existed) })?;
        Ok(existed != 0)
    }

    pub fn num_keys(&self) -> Result<usize> {
        let mut out = 0i64;
        // SAFETY: a live handle.
        check(unsafe { charlm_store_num_keys(self.0, &mut out) })?;
        Ok(usize::try_from(out)?)
    }

    fn raw(&self) -> *mut c_void {
        self.0
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: created by charlm_store_connect, freed once.
        unsafe { charlm_store_free(self.0) }
    }
}

/// A ProcessGroupNCCL over one GPU per rank, whose keys live under a prefix of the store.
pub struct Nccl(*mut c_void);

// SAFETY: ProcessGroupNCCL may be driven from any host thread.
unsafe impl Send for Nccl {}

fn tensor_ptrs(tensors: &[Tensor]) -> Vec<*mut c_void> {
    // A tch `C_tensor` is an `at::Tensor*`; the bridge only reads through it (the collective
    // writes into the shared storage, not into the handle).
    tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect()
}

impl Nccl {
    pub fn new(
        store: &Store,
        prefix: &str,
        rank: usize,
        size: usize,
        device: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let prefix = c_string(prefix)?;
        let mut out = std::ptr::null_mut();
        let (rank, size, device) = (
            c_int::try_from(rank)?,
            c_int::try_from(size)?,
            c_int::try_from(device)?,
        );
        // SAFETY: the store outlives the group (the bridge holds its own reference to it anyway).
        check(unsafe {
            charlm_nccl_new(
                store.raw(),
                prefix.as_ptr(),
                rank,
                size,
                device,
                millis(timeout),
                &mut out,
            )
        })?;
        Ok(Self(out))
    }

    /// Starts an in-place all-reduce of all `tensors` (sum, or average with `average`).
    pub fn all_reduce(&self, tensors: &[Tensor], average: bool) -> Result<NcclWork> {
        let ptrs = tensor_ptrs(tensors);
        let mut work = std::ptr::null_mut();
        // SAFETY: the tensors outlive the call; the C++ side takes its own references to them.
        check(unsafe {
            charlm_nccl_all_reduce(
                self.0,
                ptrs.as_ptr(),
                ptrs.len(),
                c_int::from(average),
                &mut work,
            )
        })?;
        Ok(NcclWork(work))
    }

    /// Starts an in-place broadcast of all `tensors` from `root`.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<NcclWork> {
        let ptrs = tensor_ptrs(tensors);
        let mut work = std::ptr::null_mut();
        let root = c_int::try_from(root)?;
        // SAFETY: as in all_reduce.
        check(unsafe {
            charlm_nccl_broadcast(self.0, ptrs.as_ptr(), ptrs.len(), root, &mut work)
        })?;
        Ok(NcclWork(work))
    }

    /// Starts a reduce-scatter: `input` is `size` equal slices along dim 0, `output` one of them.
    pub fn reduce_scatter(
        &self,
        input: &Tensor,
        output: &Tensor,
        average: bool,
    ) -> Result<NcclWork> {
        let mut work = std::ptr::null_mut();
        // SAFETY: as in all_reduce.
        check(unsafe {
            charlm_nccl_reduce_scatter(
                self.0,
                input.as_ptr() as *mut c_void,
                output.as_ptr() as *mut c_void,
                c_int::from(average),
                &mut work,
            )
        })?;
        Ok(NcclWork(work))
    }

    /// Starts an all-gather of every rank's `input` into the slices of `output`, in rank order.
    pub fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<NcclWork> {
        let mut work = std::ptr::null_mut();
        // SAFETY: as in all_reduce.
        check(unsafe {
            charlm_nccl_all_gather(
                self.0,
                input.as_ptr() as *mut c_void,
                output.as_ptr() as *mut c_void,
                &mut work,
            )
        })?;
        Ok(NcclWork(work))
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: created by charlm_nccl_new, freed once (after shutting the communicator down).
        unsafe { charlm_nccl_free(self.0) }
    }
}

/// An NCCL collective in flight.
pub struct NcclWork(*mut c_void);

// SAFETY: c10d::Work may be waited on from any host thread.
unsafe impl Send for NcclWork {}

impl NcclWork {
    /// Makes the current CUDA stream wait for the collective; the host does not block.
    pub fn wait(self) -> Result<()> {
        // SAFETY: a live handle; `self` is dropped (freed) afterwards.
        check(unsafe { charlm_work_wait(self.0) })
    }
}

impl Drop for NcclWork {
    fn drop(&mut self) {
        // SAFETY: created by the bridge, freed once.
        unsafe { charlm_work_free(self.0) }
    }
}
