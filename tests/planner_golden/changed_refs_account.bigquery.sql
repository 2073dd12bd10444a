CREATE TABLE `audience_sync_planner`.`as_chg_big_accounts_7` AS SELECT DISTINCT coalesce(`new_rows`.`planner_ref`, `old_rows`.`planner_ref`) AS `planner_ref` 
FROM (SELECT `as_snap_big_accounts_7`.`planner_ref` AS `planner_ref`, `as_snap_big_accounts_7`.`company_id` AS `company_id`, `as_snap_big_accounts_7`.`name` AS `name` 
FROM `audience_sync_planner`.`as_snap_big_accounts_7`) AS `new_rows` FULL OUTER JOIN (SELECT `as_snap_big_accounts_6`.`planner_ref` AS `planner_ref`, `as_snap_big_accounts_6`.`company_id` AS `company_id`, `as_snap_big_accounts_6`.`name` AS `name` 
FROM `audience_sync_planner`.`as_snap_big_accounts_6`) AS `old_rows` ON `new_rows`.`planner_ref` = `old_rows`.`planner_ref` AND `new_rows`.`company_id` IS NOT DISTINCT FROM `old_rows`.`company_id` AND `new_rows`.`name` IS NOT DISTINCT FROM `old_rows`.`name` 
WHERE (`new_rows`.`planner_ref` IS NULL OR `old_rows`.`planner_ref` IS NULL) AND coalesce(`new_rows`.`planner_ref`, `old_rows`.`planner_ref`) IS NOT NULL
