// gc-preload.js - garbage-collect the process on SIGUSR2 and report the effect on stderr.
//
//   node --expose-gc --require /opt/theia/gc-preload.js /opt/theia/lib/backend/main.js ...
//   kill -USR2 <backend pid>
//
// On SIGUSR2 the process runs a full, synchronous garbage collection (`global.gc()`, exposed by
// --expose-gc) and writes one JSON line to stderr, e.g.
//
//   {"wsup":"gc","pid":123,"ok":true,"ms":41.2,"heap_used_before":61234560,"heap_used_after":48211968,
//    "heap_total_before":70123520,"heap_total_after":56885248,"rss_before":150323200,
//    "rss_after":142213120,"external_before":4231301,"external_after":4120122}
//
// (bytes; the line always starts with `{"wsup":"gc"`). The idle ladder of workspace-supervisor
// sends the signal and parses the line. SIGUSR1 is deliberately not used: Node reserves it for
// the inspector. Without --expose-gc the handler still swallows SIGUSR2 (whose default action
// would kill the IDE) and reports {"wsup":"gc","ok":false,"error":...}.
'use strict';

process.on('SIGUSR2', () => {
    const report = { wsup: 'gc', pid: process.pid };
    try {
        if (typeof global.gc !== 'function') {
            report.ok = false;
            report.error = 'global.gc is not available: start node with --expose-gc';
        } else {
            const before = process.memoryUsage();
            const t0 = process.hrtime.bigint();
            global.gc();
            const ms = Number(process.hrtime.bigint() - t0) / 1e6;
            const after = process.memoryUsage();
            report.ok = true;
            report.ms = Math.round(ms * 10) / 10;
            report.heap_used_before = before.heapUsed;
            report.heap_used_after = after.heapUsed;
            report.heap_total_before = before.heapTotal;
            report.heap_total_after = after.heapTotal;
            report.rss_before = before.rss;
            report.rss_after = after.rss;
            report.external_before = before.external;
            report.external_after = after.external;
        }
    } catch (err) {
        report.ok = false;
        report.error = String(err && err.message ? err.message : err);
    }
    try {
        process.stderr.write(JSON.stringify(report) + '\n');
    } catch (_) {
        // stderr gone: nothing useful to do
    }
});
