"""The crash and fault suite (issue 8, "Proof under fire"): the four services under a steady
partner load while a random service process is SIGKILLed and started again every 10 s, the
broker is replaced once by a fresh, empty one and PostgreSQL crashes once; then everything
drains and the counts below are checked. `make chaos` runs it in full (`python -m tests.chaos`),
`tests/e2e/test_chaos.py` in a shortened form inside `make test`.

What each count means, and why it must be zero:

- **Partner replies.** Each partner message (a Kafka record) is answered by exactly one stored
  answer; the relay stamps the answer's position in capture's store on it (`x-notification-id`),
  so a relay that publishes it again (after a crash, or into a fresh broker) repeats the same
  answer, counted as a *copy*, never as a second answer. A message id sent once has exactly one
  answer; one the partner sent again (on purpose, or because no answer came in time) has one
  non-`duplicate` answer and `duplicate` answers, never more answers than sends, all naming the
  same lead. *Missing*: a message id with no answer. *Sends on the final broker unanswered*: a
  record produced after the fresh broker was up must be answered (the only sends allowed to go
  unanswered are those the replaced broker took with it; the partner's re-sends, printed apart,
  recover them).
- **Opportunities.** Every lead answered `accepted` exists exactly once as an opportunity
  (pipeline's index and event store), and no opportunity exists for another lead.
- **Gap-free on the bus** (`opportunity.events.v1`). The broker the run ends on is not the one it
  began with: the fresh one started empty, the relays republished their stores into it from the
  start. So the rule is stated for what subscribers see, as the SPEC's consumers must act: a
  subscriber keeps the last version it applied per stream (in its database) across a change of
  broker, and on a new broker reads from its beginning again. Such a subscriber, followed through
  the whole run, must never meet a version above the next one it expects (a *gap*); versions it
  already has are *copies* (the same `event_id`, or it is a *conflict*). And a new subscriber
  reading the final broker from its beginning must find every version 1..N of every opportunity,
  N from pipeline's store (*missing on the bus* otherwise). Notify's and reporting's own
  `stream_gap` alarms count as gaps, their `stream_position` below the store as missing.
  What such a new reader meets before its predecessor is printed, not counted: a relay that had
  not yet seen the fresh broker may have put a page at its head (its producer's retry of a page
  in flight reconnects to the same address) before republishing from the start. DealStream's
  consumers skip that page by the relay's `x-relay-cluster` stamp; the republish repeats it.
- **Reporting** equals a fresh replay: `dealstream replay reporting --verify` reports no
  difference.
- **Reminders.** Notify is ticked (`dealstream notify tick --now`, four days ahead, as an operator
  backfills) while the faults go on, so follow-up reminders and escalations fire and are
  delivered on `notification.events.v1` while notify is killed. *Sent twice*: two notifications
  for the same (opportunity, kind, due time, recipient), in notify's records or on the bus, or a
  delivery recorded as sent by more than one successful attempt. The same notification (same
  `notification_id`) seen again on the bus is a copy, as above. *Not issued*: a timer due at the
  last tick still unfired after it.
- **Stage changes.** Every command pipeline acknowledged (200) is on the bus at the version it
  answered with.

Copies, re-sends, kills and restarts are printed beside the counts; they are not failures.
"""
