-- Counting directives by state (the /metrics gauges, the admin page's
-- outstanding list) without scanning the table.
CREATE INDEX directives_by_state ON directives (state, id);
