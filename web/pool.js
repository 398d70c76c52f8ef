// A small pool of module Web Workers running web/worker.js (used by the page and by
// scripts/bench_wasm.mjs).

export function workerCount(cap = 4) {
  const n = Number(navigator.hardwareConcurrency) || 2;
  return Math.max(1, Math.min(cap, n));
}

export class Pool {
  constructor(n) {
    this.workers = [];
    this.pending = new Map();
    this.nextId = 1;
    this.idle = [];
    this.waiters = [];
    for (let i = 0; i < n; i++) {
      const w = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
      w.onmessage = (e) => {
        const p = this.pending.get(e.data.id);
        if (!p) return;
        this.pending.delete(e.data.id);
        if (e.data.ok) p.resolve(e.data.result);
        else p.reject(new Error(e.data.error));
      };
      w.onerror = (e) => {
        for (const [id, p] of this.pending) {
          if (p.worker === i) {
            this.pending.delete(id);
            p.reject(new Error(`worker ${i} failed: ${e.message || 'script error'}`));
          }
        }
      };
      this.workers.push(w);
      this.idle.push(i);
    }
  }

  get size() {
    return this.workers.length;
  }

  // Runs op on worker i.
  call(i, op, args = {}, transfer = []) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, worker: i });
      this.workers[i].postMessage({ id, op, ...args }, transfer);
    });
  }

  // Runs op on every worker (same arguments; nothing transferred).
  all(op, args = {}) {
    return Promise.all(this.workers.map((_, i) => this.call(i, op, args)));
  }

  async acquire() {
    if (this.idle.length) return this.idle.shift();
    return new Promise((r) => this.waiters.push(r));
  }

  release(i) {
    const w = this.waiters.shift();
    if (w) w(i);
    else this.idle.push(i);
  }

  // Runs op on the next idle worker.
  async run(op, args = {}, transfer = []) {
    const i = await this.acquire();
    try {
      return await this.call(i, op, args, transfer);
    } finally {
      this.release(i);
    }
  }

  terminate() {
    for (const w of this.workers) w.terminate();
    for (const p of this.pending.values()) p.reject(new Error('workers stopped'));
    this.pending.clear();
    this.workers = [];
  }
}
