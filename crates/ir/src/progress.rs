//! Progress of long steps (SIS, GPTQ over the layers, fine-tuning) for embedders: the command line
//! draws terminal bars itself; a library user (the Python package's `progress=` argument) sets a
//! hook that receives `(phase, done, total)` after each unit of work. One hook per process.

use std::sync::RwLock;

/// Receives `(phase, done, total)`.
pub type Hook = Box<dyn Fn(&str, u64, u64) + Send + Sync>;

static HOOK: RwLock<Option<Hook>> = RwLock::new(None);

/// Sets (or with `None` removes) the process's progress hook; returns the previous one.
pub fn set_hook(hook: Option<Hook>) -> Option<Hook> {
    let mut h = HOOK.write().unwrap_or_else(|e| e.into_inner());
    std::mem::replace(&mut *h, hook)
}

/// Reports progress of `phase` to the hook, if one is set.
pub fn report(phase: &str, done: u64, total: u64) {
    if let Some(h) = HOOK.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        h(phase, done, total);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    #[test]
    fn the_hook_sees_reports_until_removed() {
        let seen = Arc::new(Mutex::new(vec![]));
        let s = seen.clone();
        super::set_hook(Some(Box::new(move |p, d, t| s.lock().unwrap().push((p.to_string(), d, t)))));
        super::report("SIS", 3, 10);
        super::set_hook(None);
        super::report("SIS", 4, 10);
        assert_eq!(*seen.lock().unwrap(), vec![("SIS".to_string(), 3, 10)]);
    }
}
