CREATE TABLE `audience_sync_planner`.`as_chg_big_accounts_7` AS WITH `unmatched` AS 
(SELECT coalesce(`new_rows`.`planner_ref`, `old_rows`.`planner_ref`) AS `planner_ref`, `new_rows`.`planner_ref` IS NOT NULL AS `planner_new`, CASE WHEN (`new_rows`.`planner_ref` IS NOT NULL) THEN `new_rows`.`company_id` ELSE `old_rows`.`company_id` END AS `company_id`, CASE WHEN (`new_rows`.`planner_ref` IS NOT NULL) THEN `new_rows`.`name` ELSE `old_rows`.`name` END AS `name` 
FROM (SELECT trim(CAST(`company_id` AS STRING)) AS `planner_ref`, `company_id`, `name` 
FROM (SELECT * 
FROM (SELECT company_id, name FROM prod.companies WHERE seats > 100) AS `audience_sync_query`) AS `audience_rows`) AS `new_rows` FULL OUTER JOIN (SELECT `as_snap_big_accounts_6`.`planner_ref` AS `planner_ref`, `as_snap_big_accounts_6`.`company_id` AS `company_id`, `as_snap_big_accounts_6`.`name` AS `name` 
FROM `audience_sync_planner`.`as_snap_big_accounts_6`) AS `old_rows` ON `new_rows`.`planner_ref` = `old_rows`.`planner_ref` AND `new_rows`.`company_id` IS NOT DISTINCT FROM `old_rows`.`company_id` AND `new_rows`.`name` IS NOT DISTINCT FROM `old_rows`.`name` 
WHERE (`new_rows`.`planner_ref` IS NULL OR `old_rows`.`planner_ref` IS NULL) AND coalesce(`new_rows`.`planner_ref`, `old_rows`.`planner_ref`) IS NOT NULL), 
`was` AS 
(SELECT `as_snap_big_accounts_6`.`planner_ref` AS `planner_ref`, `as_snap_big_accounts_6`.`company_id` AS `company_id`, `as_snap_big_accounts_6`.`name` AS `name` 
FROM `audience_sync_planner`.`as_snap_big_accounts_6` 
WHERE `as_snap_big_accounts_6`.`planner_ref` IN (SELECT `unmatched`.`planner_ref` 
FROM `unmatched`))
 SELECT false AS `planner_new`, `was`.`planner_ref`, `was`.`company_id`, `was`.`name` 
FROM `was` UNION ALL SELECT true AS `planner_new`, `unmatched`.`planner_ref`, `unmatched`.`company_id`, `unmatched`.`name` 
FROM `unmatched` 
WHERE `unmatched`.`planner_new` UNION ALL SELECT true AS `planner_new`, `was`.`planner_ref`, `was`.`company_id`, `was`.`name` 
FROM `was` 
WHERE NOT (EXISTS (SELECT * 
FROM `unmatched` AS gone 
WHERE NOT `gone`.`planner_new` AND `gone`.`planner_ref` = `was`.`planner_ref` AND `gone`.`company_id` IS NOT DISTINCT FROM `was`.`company_id` AND `gone`.`name` IS NOT DISTINCT FROM `was`.`name`))
