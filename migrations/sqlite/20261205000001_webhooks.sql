-- Webhook delivery (RegisterRequest.webhook_url): where the hub POSTs a
-- spoke's directives, and the secret it signs them with (NULL: the spoke
-- streams or polls).
ALTER TABLE spokes ADD COLUMN webhook_url TEXT;
ALTER TABLE spokes ADD COLUMN webhook_secret TEXT;
