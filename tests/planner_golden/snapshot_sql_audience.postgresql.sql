CREATE TABLE audience_sync_planner.as_snap_pro_plan_7 AS SELECT * 
FROM (SELECT id AS user_id, email, name, title, company_id FROM prod.users WHERE plan = 'pro') AS audience_sync_query
