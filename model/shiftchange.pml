/*
 * shiftchange: the handoff protocol as supervisor/ implements it, in Promela.
 *
 * Read docs/design.md, "The model", for which function each step models,
 * the properties, the negative models and what is left out. Names of
 * inlines and steps are the names of the functions they model.
 *
 * Time is counted in ticks. The database clock is what `Clock` advances;
 * each host clock is the database clock plus a skew in 0..DRIFT that may
 * change by any amount in that range at every tick (host clocks stay
 * monotonic, CLOCK_BOOTTIME). Timestamps are kept as timers (ticks until
 * or since), so the state space is finite while time runs for ever.
 *
 * Each storage verb is one atomic step: the database is the one
 * serialization point. Every supervisor step may come any number of ticks
 * after the one before it: a slow, starved or SIGSTOPped supervisor is a
 * supervisor whose next step comes late, so freezing needs no step of its
 * own. Children are never frozen (they are small and run at the
 * supervisor's priority): when their deadline passes or their lifeline
 * reaches EOF they act before time moves on.
 *
 * Compile-time switches (spin -D...):
 *   NJ=1|2                  jobs (default 1)
 *   BUG_RELEASE_EARLY       negative model (a): release the hold before the
 *                           children are dead
 *   BUG_COMPLETE_UNFENCED   negative model (b): complete() without the lease
 *                           condition
 *   BUG_RENEW_AFTER         negative model (c): renew the children's deadline
 *                           from the time after the heartbeat
 *   BUG_DROP_OUTCOME        the supervisor may forget an outcome its job
 *                           process could not record (breaks no_job_lost)
 *   BUG_HOLD_NOT_FENCED     the shutdown as it was before this model: the
 *                           handoff's hold is kill_after + margin even when
 *                           the children's heartbeat deadline is later (a
 *                           frozen supervisor then lets a second run
 *                           start); see docs/design.md
 *   REL0=, REL1=            the release of supervisor 0 and 1: 0 none,
 *                           1 (A), 2 (B); default A and B
 *   BUG_PREFER_FOREVER      the release preference ignores avoid_until and
 *                           whether a server of another release is alive
 *                           (breaks no_job_lost when both have one release)
 */

#ifndef NJ
#define NJ 1
#endif
#define NS 2           /* supervisors (hosts), concurrency 1 each */
#define NR 4           /* server rows: two incarnations per supervisor */
#define NONE 255

/* Timing, in ticks. dead_after >= 2 * heartbeat_interval (config check). */
#define HB 2                       /* server.heartbeat_interval */
#define DA 4                       /* server.dead_after */
#define FENCE (DA - HB / 2)        /* Supervisor.fence_deadline() - last_beat_sent */
#define DRIFT 1                    /* host clock skew bound (HB/2: see below) */
#define KILL_AFTER 1               /* shutdown.kill_after */
#define HOLD_MARGIN 1              /* shutdown.HOLD_MARGIN_S */
#define SHUTDOWN_HOLD (KILL_AFTER + HOLD_MARGIN)
#define RETRY_BACKOFF 1            /* jobs.retry_backoff */
#define WINDOW 1                   /* server.release_window (> 0) */

/* server.release of each supervisor (all its incarnations): 0 none. */
#ifndef REL0
#define REL0 1
#endif
#ifndef REL1
#define REL1 2
#endif

/* Fault and operator budgets per run of the model (keep the search small;
   liveness needs them finite so that under fairness faults end). */
#ifndef MAX_DB_FAULTS
#define MAX_DB_FAULTS 1
#endif
#ifndef MAX_CRASHES
#define MAX_CRASHES 1
#endif
#ifndef MAX_STOPS
#define MAX_STOPS 1
#endif
#ifndef MAX_OPS
#define MAX_OPS 1
#endif

/* --- the database -------------------------------------------------------- */

#define J_ENQ   1   /* enqueued (claimable once its hold is over) */
#define J_PROC  2   /* processing */
#define J_SCHED 3   /* scheduled (a retry after a failure) */
#define J_SUCC  4   /* succeeded */
#define J_FAIL  5   /* failed */
#define J_GONE  6   /* deleted by an operator */

byte jstate[NJ] = J_ENQ;
byte jsrv[NJ] = NONE;        /* jobs.server_id: a row */
byte jhold[NJ];              /* ticks until run_at */
byte avoid[NJ];              /* jobs.avoid_release: 0 none, else a release */
byte avoid_left[NJ];         /* ticks until avoid_until */

#define R_FREE     0
#define R_RUN      1
#define R_STOPPING 2
#define R_STOPPED  3
#define R_DEAD     4

byte rstate[NR];
byte rage[NR];               /* ticks since heartbeat_at, saturated at DA+1 */

#define LIVE(r)  (rstate[r] == R_RUN || rstate[r] == R_STOPPING)
#define STALE(r) (rage[r] > DA)  /* heartbeat_at + dead_after < db_now() */

/* Lease tokens only ever grow, so "run.lease == job.lease" is the same as
   "no bump since the run was claimed": each run (and each outcome waiting
   in a supervisor's memory) carries that flag, and every bump of a job's
   lease (claim, take back, requeue, delete) clears it for that job. */
bool held_ok[NJ];            /* the (id, lease) transaction 1 returned is current */
byte held_by[NJ] = NONE;

/* --- hosts, supervisors, children --------------------------------------- */

byte skew[NS];               /* host clock - database clock, 0..DRIFT */
byte rel[NS];                /* servers.release of supervisor s's rows */

#define S_DOWN    0          /* not running (never started, exited, killed) */
#define S_SERVE   1          /* Supervisor.serve */
#define S_DRAIN   2          /* shut_down: _drain */
#define S_HANDOFF 3          /* shut_down: step 3, transaction 1 next */
#define S_KILL    4          /* shut_down: _stop_children next */
#define S_RELEASE 5          /* shut_down: step 6, transaction 2 next */

byte mode[NS];
byte sid[NS] = NONE;         /* Supervisor.server_id: its row */
bool fenced[NS];             /* Supervisor.fenced */
bool quiet[NS];              /* quiet: alive, heartbeating, not claiming */
bool committed[NS];          /* transaction 1 committed (as far as it knows) */
bool beat_sent[NS];          /* heartbeat() returned running; renewal next */
byte fence_left[NS];         /* fence_deadline() - clock(), host ticks */
byte since_sent[NS];         /* clock() - sent, host ticks */

/* One run slot per supervisor (concurrency 1): the child and its job process. */
byte run_job[NS] = NONE;     /* RunningJob.job */
byte run_row[NS] = NONE;     /* the server id its Assignment carries */
bool run_live[NS];           /* the job's code is running */
bool run_child[NS];          /* the child process exists */
bool run_lease[NS];          /* its lease is the job's current lease */
bool run_lost[NS];           /* RunningJob.lease_lost */
byte run_left[NS];           /* Child.deadline - clock(), host ticks */
byte run_result[NS];         /* what the child reported when it ended */

#define RES_NONE     0
#define RES_SUCC     1       /* the job succeeded, not recorded yet */
#define RES_FAIL     2       /* the job failed, not recorded yet */
#define RES_GIVEBACK 3       /* the job raised HandOff, not recorded yet */
#define RES_RECORDED 4       /* the job process recorded its own outcome */
#define RES_DROPPED  5       /* its lease was gone: nothing to record */
#define RES_FENCED   6       /* the child's deadline passed: it killed the job */

/* Supervisor.pending: one outcome waiting to be recorded. */
byte pend_kind[NS];          /* RES_SUCC, RES_FAIL or RES_GIVEBACK */
byte pend_job[NS] = NONE;
bool pend_lease[NS];

/* A pending outcome whose claim is in doubt (Supervisor._record): a job
   the slot's outcome write claimed although the slot saw that write fail
   (it committed: DB_LOST). */
byte orphan[NS] = NONE;
bool orphan_ok[NS];          /* its lease is the one that claim gave it */

bool stop_signal[NS];        /* Supervisor.stop_signal */
bool killed[NS];             /* kill -9 came; the process starts again */

byte db_faults, crashes, stops, ops;

/* --- helpers ------------------------------------------------------------- */

/* A storage call: it commits, or fails with StorageUnavailable and changes
   nothing. */
inline db_call(ok) {
    if
    :: ok = true
    :: db_faults < MAX_DB_FAULTS -> db_faults++; ok = false
    fi
}

#define DB_OK   0
#define DB_FAIL 1
#define DB_LOST 2   /* committed, but the caller saw an error (lost reply, timeout) */

inline db_call3(res) {
    if
    :: res = DB_OK
    :: db_faults < MAX_DB_FAULTS -> db_faults++; res = DB_FAIL
    :: db_faults < MAX_DB_FAULTS -> db_faults++; res = DB_LOST
    fi
}

inline bump_lease(j) {
    if
    :: run_job[0] == j -> run_lease[0] = false
    :: else -> skip
    fi;
    if
    :: run_job[1] == j -> run_lease[1] = false
    :: else -> skip
    fi;
    if
    :: pend_job[0] == j -> pend_lease[0] = false
    :: else -> skip
    fi;
    if
    :: pend_job[1] == j -> pend_lease[1] = false
    :: else -> skip
    fi;
    if
    :: orphan[0] == j -> orphan_ok[0] = false
    :: else -> skip
    fi;
    if
    :: orphan[1] == j -> orphan_ok[1] = false
    :: else -> skip
    fi;
    held_ok[j] = false
}

/* Once every job is finished or deleted nothing can break a property any
   more: time and the supervisors stop there, which keeps the search small. */
#if NJ > 1
#define ALL_DONE (jstate[0] >= J_SUCC && jstate[1] >= J_SUCC)
#else
#define ALL_DONE (jstate[0] >= J_SUCC)
#endif

#define LIVE_RUN(j) ((run_live[0] && run_job[0] == j) || (run_live[1] && run_job[1] == j))

/* storage._left_to_others. A server of another release is live: row r of
   supervisor o = 1 - s (s's own rows share s's release) is running, not
   quiet, its heartbeat fresh, its release set and not s's. One queue, which
   every server serves. */
#define OTHER_ROW_LIVE(s, r) (rstate[r] == R_RUN && !STALE(r) && !(quiet[1 - (s)] && sid[1 - (s)] == r) \
                              && rel[1 - (s)] != 0 && rel[1 - (s)] != rel[s])
#define OTHER_RELEASE_LIVE(s) (OTHER_ROW_LIVE(s, 2 * (1 - (s))) || OTHER_ROW_LIVE(s, 2 * (1 - (s)) + 1))
/* Supervisor s skips job j: taken back from a server of s's release, before
   avoid_until, while a server of another release is live. A server with no
   release is never held back. */
#ifdef BUG_PREFER_FOREVER
#define HELD_BACK(s, j) (rel[s] != 0 && avoid[j] == rel[s])
#else
#define HELD_BACK(s, j) (rel[s] != 0 && avoid[j] == rel[s] && avoid_left[j] > 0 && OTHER_RELEASE_LIVE(s))
#endif

/* Property 5: a server marked dead never records anything again. */
inline records(row) {
    assert(row == NONE || rstate[row] != R_DEAD)
}

/* Property 2: no write from a run whose lease is gone is ever applied. */
inline applied(lease_ok, row) {
    assert(lease_ok);
    records(row)
}

/* --- storage.py: the verbs ---------------------------------------------- */

/* storage._take_back: requeue with a new lease, claimable after `hold`;
   left by the release of the server it ran on (row r: supervisor r / 2)
   until hold + release_window from now. Every caller takes back a
   processing job, so jsrv[j] is its row. */
inline take_back(j, hold) {
    if
    :: jsrv[j] != NONE -> avoid[j] = rel[jsrv[j] / 2]
    :: else -> avoid[j] = 0
    fi;
    if
    :: avoid[j] != 0 -> avoid_left[j] = hold + WINDOW
    :: else -> avoid_left[j] = 0
    fi;
    jstate[j] = J_ENQ;
    jsrv[j] = NONE;
    jhold[j] = hold;
    bump_lease(j)
}

/* storage.complete: lease-fenced. */
inline complete(j, lease_ok, row, done) {
#ifdef BUG_COMPLETE_UNFENCED
    if
    :: jstate[j] == J_PROC -> applied(lease_ok, row); jstate[j] = J_SUCC; jsrv[j] = NONE; done = true
    :: else -> done = false
    fi
#else
    if
    :: lease_ok && jstate[j] == J_PROC -> applied(lease_ok, row); jstate[j] = J_SUCC; jsrv[j] = NONE; done = true
    :: else -> done = false  /* _refuse_stale */
    fi
#endif
}

/* storage.fail: lease-fenced; a retry under max_attempts, else failed. */
inline fail(j, lease_ok, row, done) {
    if
    :: lease_ok && jstate[j] == J_PROC ->
        applied(lease_ok, row);
        jsrv[j] = NONE;
#ifdef RETRIES
        if
        :: jstate[j] = J_SCHED; jhold[j] = RETRY_BACKOFF
        :: jstate[j] = J_FAIL
        fi;
#else
        jstate[j] = J_FAIL;   /* max_attempts = 1 */
#endif
        done = true
    :: else -> done = false
    fi
}

/* storage.give_back: lease-fenced; requeued at once as an interruption. */
inline give_back(j, lease_ok, row, done) {
    if
    :: lease_ok && jstate[j] == J_PROC -> applied(lease_ok, row); take_back(j, 0); done = true
    :: else -> done = false
    fi
}

/* storage.reap_server: one server proven dead, its jobs requeued at once. */
inline reap_server(row) {
    if
    :: LIVE(row) -> rstate[row] = R_DEAD; rage[row] = 0
    :: else -> skip
    fi;
    for (k2 : 0 .. NJ - 1) {
        if
        :: jstate[k2] == J_PROC && jsrv[k2] == row -> take_back(k2, 0)
        :: else -> skip
        fi
    }
    k2 = 0
}

/* storage.register_server, into a row of supervisor s that nothing refers
   to any more (a new uuid in the code). Not the row it had just now. */
#define ROW_FREE(r) (!LIVE(r) && (NJ < 1 || !(jstate[0] == J_PROC && jsrv[0] == r)) \
                     && (NJ < 2 || !(jstate[NJ - 1] == J_PROC && jsrv[NJ - 1] == r)) \
                     && run_row[0] != r && run_row[1] != r)
inline register_server(s) {
    if
    :: 2 * s != sid[s] && ROW_FREE(2 * s) -> sid[s] = 2 * s
    :: 2 * s + 1 != sid[s] && ROW_FREE(2 * s + 1) -> sid[s] = 2 * s + 1
    fi;
    rstate[sid[s]] = R_RUN;
    rage[sid[s]] = 0;
    fence_left[s] = FENCE;   /* _register: last_beat_sent = clock() */
    fenced[s] = false;
    quiet[s] = false
}

/* --- the child and the job process (jobprocess.py) ----------------------- */

proctype Child(byte s) {
    bool ok;
    bool done;
    byte res;
    byte j;
    byte next;
end:
    do
    /* Child._watch: the deadline passed; kill the job's tree, report it. */
    :: atomic { run_child[s] && run_left[s] == 0 && mode[s] != S_DOWN ->
        run_live[s] = false;
        run_child[s] = false;
        run_left[s] = 0;
        run_result[s] = RES_FENCED }
    /* JobContext.checkpoint: lease-fenced; refused -> LeaseLost ends the run. */
    :: atomic { run_live[s] && run_left[s] > 0 ->
        j = run_job[s];
        db_call(ok);
        if
        :: ok && run_lease[s] && jstate[j] == J_PROC -> applied(run_lease[s], run_row[s])
        :: ok && !(run_lease[s] && jstate[j] == J_PROC) ->
            run_live[s] = false; run_child[s] = false; run_left[s] = 0; run_result[s] = RES_DROPPED
        :: !ok -> skip  /* retried inside the job; the deadline bounds it */
        fi;
        ok = false; j = 0 }
    /* run_callable: the job's code ends; the job process records its own
       outcome, lease-fenced, in one commit (issue 21), and exits. Only if
       that write fails does the supervisor record it. */
    :: atomic { run_live[s] && run_left[s] > 0 ->
        j = run_job[s];
        db_call3(res);
        if
        :: run_result[s] = RES_SUCC;
           if
           :: res != DB_FAIL -> complete(j, run_lease[s], run_row[s], done)
           :: else -> skip
           fi
#ifdef FAILS
        :: run_result[s] = RES_FAIL;
           if
           :: res != DB_FAIL -> fail(j, run_lease[s], run_row[s], done)
           :: else -> skip
           fi
#endif
        :: run_result[s] = RES_GIVEBACK;
           if
           :: res != DB_FAIL -> give_back(j, run_lease[s], run_row[s], done)
           :: else -> skip
           fi
        fi;
        /* A reused process claims its next job in the same write
           (storage.ClaimNext, issue 11), for its run's server row, with the
           supervisor's checks: the row running and not quiet, the job due,
           not held back; and its deadline a heartbeat away; never with a give
           back (it could claim the job it gives back). Whether a stop
           notice reached it (the drain's makes it retire) is left open: the
           slot may chain in any mode, which covers a notice in flight. */
        next = NONE;
        if
        :: res != DB_FAIL && done && run_result[s] != RES_GIVEBACK && run_left[s] >= HB && rstate[run_row[s]] == R_RUN && !quiet[s] ->
            if
            :: jstate[0] == J_ENQ && jhold[0] == 0 && !HELD_BACK(s, 0) -> next = 0
#if NJ > 1
            :: jstate[1] == J_ENQ && jhold[1] == 0 && !HELD_BACK(s, 1) -> next = 1
#endif
            :: true -> skip   /* nothing due, or the slot retires */
            fi
        :: else -> skip
        fi;
        if
        :: res == DB_OK && done -> run_result[s] = RES_RECORDED
        :: res == DB_OK && !done -> run_result[s] = RES_DROPPED
        :: else -> skip  /* the supervisor records it (stale if it landed) */
        fi;
        if
        :: next != NONE ->
            records(run_row[s]);
            jstate[next] = J_PROC;
            jsrv[next] = run_row[s];
            bump_lease(next);
            if
            :: res == DB_OK ->
                /* The slot saw it commit and runs it (Property 1). */
                assert(!LIVE_RUN(next));
                run_job[s] = next;
                run_lease[s] = true;
                run_lost[s] = false;
                run_result[s] = RES_NONE
            :: else ->
                /* Committed unseen (DB_LOST): the slot runs nothing; the
                   supervisor records the outcome and gives this back. */
                orphan[s] = next;
                orphan_ok[s] = true;
                run_live[s] = false;
                run_child[s] = false;
                run_left[s] = 0
            fi
        :: else ->
            run_live[s] = false;
            run_child[s] = false;
            run_left[s] = 0
        fi;
        res = 0; done = false; j = 0; next = NONE }
    od
}

/* --- the supervisor (loop.py, shutdown.py) ------------------------------- */

/* Supervisor.kill_all: SIGKILL every child's tree and reap it; outcomes
   are dropped. */
inline kill_all(s) {
    run_live[s] = false;
    run_child[s] = false;
    run_job[s] = NONE;
    run_row[s] = NONE;
    run_result[s] = RES_NONE;
    run_left[s] = 0;
    run_lease[s] = false;
    run_lost[s] = false
}

/* Supervisor._record via record_pending: lease-fenced, under the current
   server id. */
inline record_pending(s) {
    if
    :: pend_kind[s] == RES_SUCC -> complete(pend_job[s], pend_lease[s], sid[s], done)
    :: pend_kind[s] == RES_FAIL -> fail(pend_job[s], pend_lease[s], sid[s], done)
    :: pend_kind[s] == RES_GIVEBACK -> give_back(pend_job[s], pend_lease[s], sid[s], done)
    fi;
    /* _give_back_claims_of: our write was stale, so the slot's committed,
       and with it the claim it made. */
#ifndef BUG_KEEP_ORPHAN
    if
    :: !done && orphan[s] != NONE && orphan_ok[s] && jstate[orphan[s]] == J_PROC -> take_back(orphan[s], 0)
    :: else -> skip
    fi;
#endif
    orphan[s] = NONE; orphan_ok[s] = false;
    pend_kind[s] = RES_NONE;
    pend_job[s] = NONE;
    pend_lease[s] = false
}

/* shut_down step 5: _stop_children (SIGTERM, kill_after, kill_all). */
inline stop_children(s) {
    atomic { kill_all(s) }
}

/* shut_down step 6: storage.release_handoff, transaction 2, if
   transaction 1 was committed. */
inline release_handoff(s) {
    atomic {
        if
        :: committed[s] ->
            db_call(ok);
            if
            :: ok ->
                for (j : 0 .. NJ - 1) {
                    if
                    :: held_by[j] == s && held_ok[j] && jstate[j] == J_ENQ ->
                        /* Property 4: a hold ends only once no run of the
                           job is live any more. */
                        assert(!LIVE_RUN(j));
                        jhold[j] = 0
                    :: else -> skip
                    fi
                }
                if
                :: LIVE(sid[s]) -> rstate[sid[s]] = R_STOPPED; rage[sid[s]] = 0
                :: else -> skip
                fi
            :: else -> skip   /* the hold expires by itself */
            fi
        :: else -> skip
        fi;
        ok = false; j = 0 }
}

/* Once the process exits, what transaction 1 returned is forgotten. */
inline forget_held(s) {
    for (j : 0 .. NJ - 1) {
        if
        :: held_by[j] == s -> held_by[j] = NONE; held_ok[j] = false
        :: else -> skip
        fi
    }
    j = 0
}

proctype Supervisor(byte s) {
    bool ok;
    bool done;
    bool beat_ok;
    bool exit_requested;
    byte res;
    byte hold;
    byte j;
    byte r;
    byte st;
    byte k2;
end:
    do
    :: !ALL_DONE -> {
        /* Supervisor.start: _reap_previous_incarnation (our own rows: the old
           process is provably gone, and its children died of lifeline EOF
           before a new process is up), then _register. */
        atomic { run_job[s] == NONE ->
            stop_signal[s] = false;
            db_call(ok);
            if
            :: ok ->
                reap_server(2 * s);
                reap_server(2 * s + 1);
                register_server(s);
                records(sid[s]);
                mode[s] = S_SERVE
            :: else -> skip
            fi;
            ok = false }
        if
        :: mode[s] == S_DOWN -> skip   /* retried */
        :: else ->
            /* Supervisor.serve: one turn of the loop per iteration. Every
               step may come any number of ticks after the one before. */
end_serve:
            do
            :: !ALL_DONE ->
                /* beat, first half: sent = clock(), storage.heartbeat.
                   One step: a later heartbeat_at only makes others wait
                   longer before they reap, so this is the worst case. */
                atomic {
                    since_sent[s] = 0;
                    db_call(ok);
                    if
                    :: !ok ->
                        /* _beat_failed */
                        if
                        :: !fenced[s] && fence_left[s] == 0 -> kill_all(s); fenced[s] = true
                        :: else -> skip
                        fi
                    :: ok && rstate[sid[s]] == R_RUN && !fenced[s] ->
                        records(sid[s]);
                        rage[sid[s]] = 0;
                        beat_sent[s] = true
                    :: ok && !(rstate[sid[s]] == R_RUN && !fenced[s]) ->
                        /* _lost_server */
                        st = rstate[sid[s]];
                        kill_all(s);
                        if
                        :: st == R_STOPPING || st == R_STOPPED -> exit_requested = true
                        :: else ->
                            db_call(ok);
                            if
                            :: ok ->
                                if
                                :: st == R_RUN -> reap_server(sid[s])  /* we fenced ourselves */
                                :: else -> skip
                                fi;
                                register_server(s);
                                records(sid[s])
                            :: else -> fenced[s] = true  /* again at the next beat */
                            fi
                        fi
                    fi;
                    ok = false; st = 0;
                    if
                    :: exit_requested -> break
                    :: else -> skip
                    fi
#ifdef BUG_RENEW_AFTER
                }
                /* The reply of the heartbeat may come any time after its
                   commit: the negative model (c) takes the time here. */
                atomic {
#else
                    ;
#endif
                    /* beat, second half: last_beat_sent = sent, child.renew,
                       then _kill_runs_of_lost_jobs (storage.lost_leases). In
                       one step with the heartbeat: the deadline is taken
                       before the heartbeat, so time spent in the heartbeat
                       only brings it closer; none at all is the worst case. */
                    if
                    :: beat_sent[s] ->
#ifdef BUG_RENEW_AFTER
                        fence_left[s] = FENCE;             /* clock() after the heartbeat */
#else
                        if
                        :: since_sent[s] >= FENCE -> fence_left[s] = 0
                        :: else -> fence_left[s] = FENCE - since_sent[s]
                        fi;
#endif
                        if
                        :: run_child[s] -> run_left[s] = fence_left[s]
                        :: else -> skip
                        fi;
                        beat_sent[s] = false;
                        since_sent[s] = 0;
                        beat_ok = true;
                        db_call(ok);
                        if
                        :: ok && run_child[s] && !run_lost[s] &&
                           !(run_lease[s] && jstate[run_job[s]] == J_PROC && jsrv[run_job[s]] == sid[s]) ->
                            /* kill_tree(child.pid): the child and its job */
                            run_lost[s] = true; run_live[s] = false; run_child[s] = false; run_left[s] = 0
                        :: else -> skip
                        fi
                    :: else -> skip
                    fi;
                    ok = false }

                /* The rest of the turn, one step: housekeeping, claim, the
                   wait, collect_children and record_pending, handle_signals.
                   (Each is its own transaction in the code; no other
                   process acts between them here, to keep the search
                   small.) */
                atomic {
                    /* _housekeeping (storage.reap by the database clock only,
                   storage.promote_due), then claim (storage.claim) and
                   _start_job (spawn with fence_deadline()): no claim when
                   quiet, fenced, draining, or so close to the fence that
                   the job would be fenced before the next heartbeat. Two
                   transactions. */
                    if
                    :: beat_ok ->
                        db_call(ok);
                        if
                        :: ok ->
                            for (r : 0 .. NR - 1) {
                                if
                                :: LIVE(r) && STALE(r) -> rstate[r] = R_DEAD; rage[r] = 0
                                :: else -> skip
                                fi
                            }
                            for (j : 0 .. NJ - 1) {
                                if
                                :: jstate[j] == J_PROC && !(LIVE(jsrv[j]) && !STALE(jsrv[j])) -> take_back(j, 0)
                                :: else -> skip
                                fi;
                                if
                                :: jstate[j] == J_SCHED && jhold[j] == 0 -> jstate[j] = J_ENQ
                                :: else -> skip
                                fi
                            }
                        :: else -> skip
                        fi
                    :: else -> skip
                    fi;
                    beat_ok = false; ok = false; r = 0; j = 0;
                    if
                    :: mode[s] == S_SERVE && !quiet[s] && !fenced[s] && run_job[s] == NONE && fence_left[s] >= HB ->
                        db_call(ok);
                        if
                        :: ok && rstate[sid[s]] == R_RUN ->
                            /* The release preference (issue 14,
                               storage._left_to_others): a due job taken back
                               from a server of this release is skipped while
                               HELD_BACK. */
                            if
                            :: jstate[0] == J_ENQ && jhold[0] == 0 && !HELD_BACK(s, 0) -> j = 0
#if NJ > 1
                            :: jstate[1] == J_ENQ && jhold[1] == 0 && !HELD_BACK(s, 1) -> j = 1
#endif
                            :: else -> j = NONE
                            fi;
                            if
                            :: j != NONE ->
                                records(sid[s]);
                                jstate[j] = J_PROC;
                                jsrv[j] = sid[s];
                                bump_lease(j);
                                /* Property 1: never two live runs of one job.
                                   A run only starts here, so checking here
                                   checks every state. */
                                assert(!LIVE_RUN(j));
                                run_job[s] = j;
                                run_row[s] = sid[s];
                                run_live[s] = true;
                                run_child[s] = true;
                                run_lease[s] = true;
                                run_lost[s] = false;
                                run_result[s] = RES_NONE;
                                run_left[s] = fence_left[s]
                            :: else -> skip
                            fi
                        :: else -> skip
                        fi
                    :: else -> skip
                    fi;
                    ok = false; j = 0;

                    /* collect_children and _finish (RunningJob.outcome) */
                    if
                    :: run_job[s] != NONE && !run_child[s] && pend_kind[s] == RES_NONE ->
                        if
                        :: run_lost[s] || run_result[s] == RES_RECORDED || run_result[s] == RES_DROPPED -> skip
#ifdef BUG_DROP_OUTCOME
                        :: true -> skip   /* forget an outcome the job process could not record */
#endif
                        :: else ->
                            pend_job[s] = run_job[s];
                            pend_lease[s] = run_lease[s];
                            if
                            :: run_result[s] == RES_FENCED -> pend_kind[s] = RES_GIVEBACK
                            :: else -> pend_kind[s] = run_result[s]
                            fi
                        fi;
                        run_job[s] = NONE; run_row[s] = NONE; run_result[s] = RES_NONE;
                        run_lease[s] = false; run_lost[s] = false; run_left[s] = 0
                    :: else -> skip
                    fi;
                    /* record_pending */
                    if
                    :: pend_kind[s] != RES_NONE ->
                        db_call(ok);
                        if
                        :: ok -> record_pending(s)
                        :: else -> skip   /* kept, retried */
                        fi
                    :: else -> skip
                    fi;
                    ok = false; done = false;

                    /* handle_signals; shut_down step 1 (stop claiming) and
                       step 2, _drain: the loop runs on without claiming
                       (issue 10) until the drain ends. */
                    if
                    :: mode[s] == S_SERVE && stop_signal[s] -> mode[s] = S_DRAIN
                    :: mode[s] == S_DRAIN -> skip
                    :: mode[s] == S_DRAIN -> mode[s] = S_HANDOFF; break
                    :: else -> skip
                    fi
                }
            od;

            if
            :: exit_requested ->
                /* stop_after_external_handoff: release_handoff(sid, []) */
                atomic {
                    db_call(ok);
                    if
                    :: ok && LIVE(sid[s]) -> rstate[sid[s]] = R_STOPPED; rage[sid[s]] = 0
                    :: else -> skip
                    fi;
                    exit_requested = false;
                    mode[s] = S_DOWN; sid[s] = NONE; fenced[s] = false; quiet[s] = false; fence_left[s] = 0;
                    pend_kind[s] = RES_NONE; pend_job[s] = NONE; pend_lease[s] = false; orphan[s] = NONE; orphan_ok[s] = false;
                    ok = false }
            :: else ->
                /* shut_down step 3: storage.handoff, transaction 1 */
                atomic {
                    /* shutdown._hold: until the children are dead even if
                       this process freezes right after the commit: kill_after,
                       or their own deadline (fence_deadline(): no heartbeat
                       renews it from here on) when that is later, plus the
                       margin (the code's HOLD_MARGIN_S / 2 there; ticks are
                       whole, so HOLD_MARGIN - HOLD_MARGIN / 2 here). */
#ifndef BUG_HOLD_NOT_FENCED
                    if
                    :: fence_left[s] + HOLD_MARGIN - HOLD_MARGIN / 2 > SHUTDOWN_HOLD ->
                        hold = fence_left[s] + HOLD_MARGIN - HOLD_MARGIN / 2
                    :: else -> hold = SHUTDOWN_HOLD
                    fi;
#else
                    hold = SHUTDOWN_HOLD;
#endif
                    db_call3(res);
                    if
                    :: res != DB_FAIL ->
                        if
                        :: rstate[sid[s]] == R_RUN -> rstate[sid[s]] = R_STOPPING
                        :: else -> skip
                        fi;
                        for (j : 0 .. NJ - 1) {
                            if
                            :: jstate[j] == J_PROC && jsrv[j] == sid[s] ->
                                take_back(j, hold);
                                held_by[j] = s;
                                held_ok[j] = true
                            :: else -> skip
                            fi
                        }
                    :: else -> skip
                    fi;
                    committed[s] = (res == DB_OK);
                    /* sup.dropping = True: nothing more is recorded */
                    pend_kind[s] = RES_NONE; pend_job[s] = NONE; pend_lease[s] = false; orphan[s] = NONE; orphan_ok[s] = false;
                    mode[s] = S_KILL;
                    res = 0; j = 0; hold = 0 }
#ifdef BUG_RELEASE_EARLY
                release_handoff(s);
                stop_children(s);
#else
                stop_children(s);
                release_handoff(s);
#endif
                atomic { mode[s] = S_DOWN; sid[s] = NONE; quiet[s] = false; committed[s] = false; fence_left[s] = 0; forget_held(s) }
            fi
        fi
       } unless { killed[s] -> killed[s] = false; exit_requested = false; beat_ok = false }
    od
}

/* --- the platform: signals and kill -9 ------------------------------------- */
/* Signals and kill -9 go to supervisor 0 (host 0, the one whose clock
   drifts); supervisor 1 is its peer, which reaps and claims. Both are the
   same code, so with one fault of each kind this loses only the runs where
   the peer is the victim, which mirror these. -DFAULTS_BOTH lifts it. */

/* kill -9: the process is gone, with everything in its memory; its
   children see lifeline EOF and kill their jobs (taken as one step: see
   "What the model leaves out"). */
inline kill_supervisor(s) {
    crashes++;
    kill_all(s);   /* lifeline EOF: each child kills its job's tree */
    killed[s] = true;
    mode[s] = S_DOWN; sid[s] = NONE; fenced[s] = false; committed[s] = false;
    beat_sent[s] = false; since_sent[s] = 0; quiet[s] = false; stop_signal[s] = false; fence_left[s] = 0;
    pend_kind[s] = RES_NONE; pend_job[s] = NONE; pend_lease[s] = false; orphan[s] = NONE; orphan_ok[s] = false;
    forget_held(s)
}

active proctype Platform() {
    byte j;
end:
    do
    /* SIGTERM (a deploy): Supervisor._queue_signal */
    :: atomic { stops < MAX_STOPS && mode[0] == S_SERVE && !stop_signal[0] -> stops++; stop_signal[0] = true }
#ifdef FAULTS_BOTH
    :: atomic { stops < MAX_STOPS && mode[1] == S_SERVE && !stop_signal[1] -> stops++; stop_signal[1] = true }
    :: atomic { crashes < MAX_CRASHES && mode[1] != S_DOWN -> kill_supervisor(1) }
#endif
    :: atomic { crashes < MAX_CRASHES && mode[0] != S_DOWN -> kill_supervisor(0) }
    od
}

/* --- operators (cli.py, handoff.py) --------------------------------------- */

active proctype Operator() {
    byte j;
    byte r;
end:
    do
    /* storage.requeue: new lease; a processing job is held for dead_after. */
    :: atomic { ops < MAX_OPS ->
        ops++;
        if
        :: j = 0
#if NJ > 1
        :: j = 1
#endif
        fi;
        if
        :: jstate[j] != J_GONE ->
            if
            :: jstate[j] == J_PROC -> jhold[j] = DA
            :: else -> jhold[j] = 0
            fi;
            jstate[j] = J_ENQ;
            jsrv[j] = NONE;
            bump_lease(j)
        :: else -> skip
        fi;
        j = 0 }
    /* storage.delete */
    :: atomic { ops < MAX_OPS ->
        ops++;
        if
        :: j = 0
#if NJ > 1
        :: j = 1
#endif
        fi;
        jstate[j] = J_GONE; jsrv[j] = NONE; jhold[j] = 0;
        bump_lease(j);
        j = 0 }
    /* handoff.hand_off of a server on another host: storage.handoff with a
       hold of dead_after; nobody releases it, it expires. */
    :: atomic { ops < MAX_OPS ->
        ops++;
        if
        :: LIVE(0) -> r = 0
        :: LIVE(1) -> r = 1
        :: LIVE(2) -> r = 2
        :: LIVE(3) -> r = 3
        :: else -> r = NONE
        fi;
        if
        :: r != NONE ->
            if
            :: rstate[r] == R_RUN -> rstate[r] = R_STOPPING
            :: else -> skip
            fi;
            for (j : 0 .. NJ - 1) {
                if
                :: jstate[j] == J_PROC && jsrv[j] == r -> take_back(j, DA)
                :: else -> skip
                fi
            }
        :: else -> skip
        fi;
        j = 0; r = 0 }
    /* quiet / unquiet (SIGTSTP or `shiftchange quiet`) */
    :: atomic { ops < MAX_OPS && mode[0] == S_SERVE -> ops++; quiet[0] = !quiet[0] }
#ifdef FAULTS_BOTH
    :: atomic { ops < MAX_OPS && mode[1] == S_SERVE -> ops++; quiet[1] = !quiet[1] }
#endif
    od
}

/* --- time ------------------------------------------------------------------ */

/* A child whose deadline passed, or whose supervisor is gone, acts before
   time moves on. */
#define URGENT(s) (run_child[s] && run_left[s] == 0)

inline host_tick(s, adv) {
    if
    :: fence_left[s] > adv -> fence_left[s] = fence_left[s] - adv
    :: else -> fence_left[s] = 0
    fi;
    if
    :: run_left[s] > adv -> run_left[s] = run_left[s] - adv
    :: else ->
        run_left[s] = 0;
        if
        :: run_child[s] ->
            /* Child._watch: the deadline passed, at this instant: the child
               kills the job's tree before anything else happens at the
               new time (DRIFT = HB/2 ticks stands for any drift below
               HB/2, so ties go to the child). */
            run_live[s] = false;
            run_child[s] = false;
            run_result[s] = RES_FENCED
        :: else -> skip
        fi
    fi;
    if
    :: beat_sent[s] && since_sent[s] + adv < FENCE -> since_sent[s] = since_sent[s] + adv
    :: beat_sent[s] && since_sent[s] + adv >= FENCE -> since_sent[s] = FENCE
    :: else -> skip
    fi
}

active proctype Clock() {
    byte adv;
    byte old;
    byte r;
    byte j;
end:
    do
    :: atomic { !URGENT(0) && !URGENT(1) && !ALL_DONE ->
        /* the database clock: one tick */
        for (r : 0 .. NR - 1) {
            if
            :: LIVE(r) && rage[r] <= DA -> rage[r]++
            :: else -> skip
            fi
        }
        for (j : 0 .. NJ - 1) {
            /* Property 4: no hold is longer than its bound (dead_after:
               a shutdown's is kill_after + HOLD_MARGIN_S or the children's
               deadline + half of it, a requeue's or a remote handoff's is
               dead_after), and it counts down on the database clock. */
            assert(jhold[j] <= DA && SHUTDOWN_HOLD <= DA);
            if
            :: jhold[j] > 0 -> jhold[j]--
            :: else -> skip
            fi;
            /* avoid_until passes; past it avoid_release no longer matters
               (forgotten here to keep the state space small) */
            assert(avoid_left[j] <= DA + WINDOW);
            if
            :: avoid_left[j] > 1 -> avoid_left[j]--
            :: avoid_left[j] == 1 ->
                avoid_left[j] = 0;
#ifndef BUG_PREFER_FOREVER
                avoid[j] = 0
#else
                skip
#endif
            :: else -> skip
            fi
        }
        /* each host clock: one tick, give or take the change of its skew */
#ifndef NO_DRIFT
        old = skew[0];
        if
        :: skew[0] = 0
        :: skew[0] = DRIFT
        fi;
        adv = 1 + skew[0] - old;
#else
        adv = 1;
#endif
        host_tick(0, adv);
#ifdef DRIFT_BOTH
        old = skew[1];
        if
        :: skew[1] = 0
        :: skew[1] = DRIFT
        fi;
        adv = 1 + skew[1] - old;
#else
        adv = 1;   /* host 1 keeps the database's time: see "left out" */
#endif
        host_tick(1, adv);
        adv = 0; old = 0; r = 0; j = 0 }
    od
}

init {
    atomic {
        rel[0] = REL0;
        rel[1] = REL1;
        run Supervisor(0);
        run Supervisor(1);
        run Child(0);
        run Child(1)
    }
}

/* --- properties -------------------------------------------------------------
   1, 2, 4 and 5 are assertions above (checked in every state a write, a
   claim or a release can happen in). 3 is this LTL formula, checked with
   weak fairness: every job, again and again, is finished (or deleted),
   claimable, or running; "claimable" includes a job whose server's
   heartbeat is stale (the next reap requeues it) and a scheduled retry that
   is due (the next promote_due makes it enqueued), and an enqueued job is
   claimable only if the release preference holds back at most one of the
   two supervisors from it (so the preference cannot starve a job). */

#define FINISHED(j)  (jstate[j] == J_SUCC || jstate[j] == J_FAIL || jstate[j] == J_GONE)
#define CLAIMABLE(j) (jstate[j] == J_ENQ && jhold[j] == 0 && !(HELD_BACK(0, j) && HELD_BACK(1, j)) || \
                      jstate[j] == J_SCHED && jhold[j] == 0 || \
                      jstate[j] == J_PROC && (jsrv[j] == NONE || !LIVE(jsrv[j]) || STALE(jsrv[j])))
#define RUNNING(j)   (jstate[j] == J_PROC && LIVE_RUN(j))

ltl no_job_lost { [] <> (FINISHED(0) || CLAIMABLE(0) || RUNNING(0)) }
